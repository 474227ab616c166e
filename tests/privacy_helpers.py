"""A tiny batch with planted identifiers, run through every stage, and scans of what was written."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from jobs.stages.ingest import ingest_batch
from jobs.stages.land import land_batch
from jobs.stages.pseudonymise import pseudonymise_batch
from jobs.stages.validate import validate_batch
from tests.landing_helpers import LAURENTIDES_ENCOUNTER_HEADER, LAURENTIDES_PATIENT_HEADER, latin1_csv, write_batch

EST = "chu_laurentides"
BATCH = "20260105-001"
# Planted identifiers: none of them may be found outside landing and bronze.
PLANTED_NAME = "Zéphyrine Quintalbert"
PLANTED_ADDRESS = "4417 rue Quintalbert"
PLANTED_FILE_WORD = "Quintalbertfile"
PATIENT_FILE = f"Zephyrine_{PLANTED_FILE_WORD}_5f0e6d1c.csv"

PATIENTS = [
    f"L001;TREM85521201;Quintalbert;Zéphyrine;12/02/1985;F;{PLANTED_ADDRESS};Montréal;H2X 1Y4;514-555-0101;z@x.ca;;A",
    "L002;GAGL90010112;Gagnon;Luc;01/01/1990;M;3 av. du Parc;Laval;H7N 2B3;450-555-0102;l@x.ca;;A",
    "L003;XXXX;Roy;Ana;01/01/1970;F;9 rue Roy;Laval;H7N 2B3;450-555-0103;a@x.ca;;A",
]
ENCOUNTERS = [
    f"S1;L001;03/01/2026 08:00;04/01/2026 12:30;hospitalisation;Médecine interne;{PLANTED_NAME} se plaint;A",
    "S2;L002;03/01/2026 08:00;;urgence;Urgence;;A",
]
LAB_HEADER = "no_resultat;no_sejour;no_dossier;code_loinc;valeur;unite_mesure;date_prelevement;action"
LABS = [
    # A survey answer whose value is the patient's street address (LOINC 56799-0).
    f"R1;S1;L001;56799-0;{PLANTED_ADDRESS};;03/01/2026 09:00;A",
    f"R2;S1;L001;56799-0;{PLANTED_NAME};;03/01/2026 09:00;A",
    "R3;S1;L001;2345-7;5,4;mmol/L;03/01/2026 09:00;A",
    "R4;S2;L002;94500-6;positive;;03/01/2026 09:00;A",
    "R5;S2;L002;94500-6;<0,5;;03/01/2026 09:00;A",
    # A bad date: quarantined at validation, with its value.
    f"R6;S1;L001;56799-0;{PLANTED_ADDRESS};;99/99/2026 09:00;A",
]
CONSENT_HEADER = "no_consentement;no_dossier;finalite;decision;date_decision;debut_validite;fin_validite;action"
CONSENTS = [
    "C1;L001;research_general;accord;01/01/2025;01/01/2025;;A",
    "C2;L002;research_general;accord;01/01/2025;01/01/2025;;A",
    "C3;L001;research_oncology;accord;01/01/2025;01/01/2025;;A",
]


def write_planted_batch(landing: Path) -> Path:
    return write_batch(landing, EST, BATCH, {
        PATIENT_FILE: ("patient", latin1_csv(LAURENTIDES_PATIENT_HEADER, PATIENTS)),
        "sejours.csv": ("encounter", latin1_csv(LAURENTIDES_ENCOUNTER_HEADER, ENCOUNTERS)),
        "resultats.csv": ("lab_result", latin1_csv(LAB_HEADER, LABS)),
        "consentements.csv": ("consent", latin1_csv(CONSENT_HEADER, CONSENTS)),
    })


def run_batch(spark, lake, consortium, landing: Path, key, stop_before_land: bool = False) -> None:
    """ingest → pseudonymise → validate (→ land) of the planted batch."""
    outcome = ingest_batch(spark, lake, landing, consortium, EST, BATCH)
    pseudonymise_batch(spark, lake, consortium, key, EST, BATCH)
    validate_batch(spark, lake, consortium, EST, BATCH, outcome.kind)
    if not stop_before_land:
        land_batch(spark, lake, EST, BATCH, key.fingerprint)


def encodings(secret: bytes) -> list[str]:
    """How a secret could show in text: hex (both cases), base64, raw bytes read as latin-1."""
    out = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode("ascii")]
    raw = secret.decode("latin-1")
    return out + ([raw] if len(raw.strip()) >= 8 else [])


def event_log_text(spark) -> str:
    """Everything the Spark event log of this session holds so far (uncompressed, see conftest)."""
    root = Path(spark.conf.get("spark.eventLog.dir").removeprefix("file:"))
    return "".join(p.read_text(encoding="latin-1") for p in root.rglob("*") if p.is_file())


def lake_files(root: Path, skip_zones: tuple[str, ...] = ()) -> list[Path]:
    """Every data file, Delta commit, checkpoint and checksum under the lake, but the zones skipped.

    Hadoop's hidden ``.<name>.crc`` sidecars only checksum the files listed here.
    """
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.relative_to(root).parts[0] not in skip_zones)


def file_text(path: Path, spark=None) -> str:
    """A file as text; Parquet files also row by row (their values are compressed in the bytes)."""
    raw = path.read_bytes()
    text = raw.decode("latin-1") + raw.decode("utf-8", errors="replace")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        text += json.dumps(pq.ParquetFile(path).read().to_pylist(), default=str, ensure_ascii=False)
    return text

def hmac_hex(key: bytes, message: str) -> str:
    import hashlib
    import hmac

    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()
