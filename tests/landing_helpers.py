"""Write small landing batches by hand, for tests that need exact control."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def write_batch(landing: Path, establishment: str, batch_id: str, files: dict[str, tuple[str, bytes]],
                extracted_at: str = "2026-01-05T02:00:00Z", kind: str = "full", has_header: bool = True,
                manifest_overrides: dict | None = None) -> Path:
    """files: relative path -> (dataset, bytes). Returns the batch folder."""
    folder = landing / establishment / batch_id
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for rel, (dataset, content) in files.items():
        (folder / rel).write_bytes(content)
        rows = sum(1 for line in content.splitlines() if line.strip()) - (1 if has_header else 0)
        entries.append({"dataset": dataset, "path": rel, "sha256": hashlib.sha256(content).hexdigest(), "rows": rows})
    manifest = {"establishment": establishment, "batch_id": batch_id, "extracted_at": extracted_at,
                "kind": kind, "files": entries}
    manifest.update(manifest_overrides or {})
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


LAURENTIDES_PATIENT_HEADER = ("no_dossier;nam;nom;prenom;date_naissance;sexe;adresse;ville;code_postal;"
                              "telephone;courriel;date_deces;action")
LAURENTIDES_ENCOUNTER_HEADER = "no_sejour;no_dossier;date_debut;date_fin;type_sejour;unite;note_admission;action"
RIVIERE_PATIENT_HEADER = ("mrn,health_card_number,last_name,first_name,birth_date,sex,address,city,postal_code,"
                          "phone,email,death_date,op")


def latin1_csv(header: str, rows: list[str]) -> bytes:
    return ("\r\n".join([header, *rows]) + "\r\n").encode("latin-1")


def utf8_bom_csv(header: str, rows: list[str]) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode("utf-8-sig")
