"""Generate a whole synthetic consortium: landing batches, manifests and ground truth.

Example::

    from pathlib import Path
    from jobs.core.config import load_consortium
    from jobs.generate import generate_consortium

    summary = generate_consortium(Path("demo"), load_consortium("config"), patients=1000, batches=3,
                                  seed=42, defect_rate=0.01)

writes ``demo/landing/<landing_folder>/<batch_id>/`` for every establishment
and ``demo/ground_truth/{defects,persons,consents}.jsonl``. The same arguments
always give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from jobs.core.config import Consortium, CsvProfile, Establishment, FhirProfile
from jobs.generate import clinical, defects as D
from jobs.generate.calendar import Calendar
from jobs.generate.csv_writer import WrittenFile, write_csv
from jobs.generate.defects import apply_field_defects
from jobs.generate.fhir_writer import DELETIONS_FILE, RESOURCE_TYPES, write_deletions, write_ndjson
from jobs.generate.formats import is_valid_nam
from jobs.generate.people import GenerationError, make_links, make_population, names_as_typed, phones_as_typed
from jobs.generate.timeline import CHANGE_DELETE, GENERATED_DATASETS, plan_versions
from jobs.core.schemas import RECORD_REF

MANIFEST = "manifest.json"
KIND_FULL = "full"
KIND_INCREMENTAL = "incremental"

# Independent random streams: changing how one part draws never shifts the others.
_STREAMS = {name: i for i, name in enumerate((
    "population", "links", "names", "encounters", "notes", "conditions", "diagnoses", "labs", "medications",
    "consents", "identifiers", "timeline", "defects", "writers"))}


@dataclass(frozen=True)
class GenerationSummary:
    out_dir: Path
    persons: int
    # establishment -> batch id -> dataset (or "bundle") -> rows as counted in the manifest
    rows: dict[str, dict[str, dict[str, int]]]
    defects: int
    defects_by_kind: dict[str, int]
    seconds: float
    batch_ids: list[str] = field(default_factory=list)


def _stream(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[name]])


# ----------------------------------------------------------- identifiers ----

MRN_STYLES = ("{n:08d}", "{prefix}{n:07d}", "{prefix}-{n:06d}")
REF_STYLES = ("{letter}{n:09d}", "{prefix}{letter}{n:08d}", "{prefix}-{letter}-{n:07d}")
REF_LETTERS = {"encounter": "V", "diagnosis": "D", "lab_result": "R", "medication": "O", "consent": "C"}


def _prefix(establishment_id: str) -> str:
    return "".join(part[0] for part in establishment_id.split("_")).upper()


def _sequence(rng: np.random.Generator, count: int) -> np.ndarray:
    return int(rng.integers(10_000, 400_000)) + np.cumsum(rng.integers(1, 4, count))


def _uuids(rng: np.random.Generator, count: int) -> np.ndarray:
    raw = np.frombuffer(rng.bytes(16 * count), dtype=np.uint8).reshape(count, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    text = raw.tobytes().hex()
    return np.array([f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" for h in
                     (text[32 * i:32 * i + 32] for i in range(count))], dtype=object)


def _assign_identifiers(rng: np.random.Generator, links: pd.DataFrame, tables: dict[str, pd.DataFrame],
                        establishments: list[Establishment]) -> None:
    """MRNs and record references, in each establishment's own style."""
    links["mrn"] = ""
    links["patient_ref"] = ""
    for index, est in enumerate(establishments):
        prefix = _prefix(est.id)
        rows = np.flatnonzero(links["_est"].to_numpy() == index)
        numbers = rng.permutation(_sequence(rng, len(rows)))
        style = MRN_STYLES[index % len(MRN_STYLES)]
        mrn = np.array([style.format(n=n, prefix=prefix) for n in numbers.tolist()], dtype=object)
        links.loc[rows, "mrn"] = mrn
        links.loc[rows, "patient_ref"] = _uuids(rng, len(rows)) if isinstance(est.input, FhirProfile) else mrn
        for dataset, letter in REF_LETTERS.items():
            table = tables[dataset]
            positions = np.flatnonzero(table["_est"].to_numpy() == index)
            if isinstance(est.input, FhirProfile):
                refs = _uuids(rng, len(positions))
            else:
                style = REF_STYLES[index % len(REF_STYLES)]
                refs = np.array([style.format(n=n, prefix=prefix, letter=letter)
                                 for n in _sequence(rng, len(positions)).tolist()], dtype=object)
            table.loc[positions, RECORD_REF[dataset]] = refs
    for dataset in REF_LETTERS:
        tables[dataset]["patient_ref"] = links["patient_ref"].to_numpy()[tables[dataset]["_link"].to_numpy()]
    encounter_refs = tables["encounter"]["encounter_ref"].to_numpy()
    for dataset in ("diagnosis", "lab_result", "medication"):
        tables[dataset]["encounter_ref"] = encounter_refs[tables[dataset]["_enc"].to_numpy()]


# ------------------------------------------------------------- building ----

def _writable_purposes(est: Establishment, consortium: Consortium) -> set[str]:
    if isinstance(est.input, FhirProfile):
        return set(est.input.purpose_codes.values())
    mapping = est.input.value_maps.get("purpose")
    return set(mapping.values()) if mapping else set(consortium.purposes)


def _build_tables(consortium: Consortium, establishments: list[Establishment], patients: int, calendar: Calendar,
                  seed: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    as_of = calendar.window(0)[1]
    population = make_population(_stream(seed, "population"), patients, as_of)
    links = make_links(_stream(seed, "links"), population, len(establishments), calendar.batches)
    names_rng = _stream(seed, "names")
    links = pd.concat([links, names_as_typed(names_rng, links, population)], axis=1)
    links["phone"] = phones_as_typed(names_rng, population["phone"].to_numpy()[links["_person"].to_numpy()])
    for column in ("street_address", "city", "postal_code", "email", "nam", "sex", "birth_date"):
        links[column] = population[column].to_numpy()[links["_person"].to_numpy()]

    enc_rng = _stream(seed, "encounters")
    deceased = clinical.choose_deceased(enc_rng, links, population)
    encounters = clinical.make_encounters(enc_rng, links, population, calendar, deceased)
    encounters["admission_note"] = clinical.admission_notes(_stream(seed, "notes"), encounters, links, population)

    # A death is recorded only after the person's last visit, and only before the first extract.
    last_end = pd.Series(encounters["_true_end"].to_numpy()).groupby(encounters["_person"].to_numpy()).max()
    death = np.full(patients, np.datetime64("NaT", "D"))
    ends = last_end.to_numpy().astype("datetime64[D]")
    death_day = ends + enc_rng.integers(1, 20, len(ends)).astype("timedelta64[D]")
    ok = death_day < as_of.astype("datetime64[D]") - np.timedelta64(1, "D")
    death[last_end.index.to_numpy()[ok]] = death_day[ok]
    death[~deceased] = np.datetime64("NaT", "D")
    links["deceased_date"] = death[links["_person"].to_numpy()]

    groups = clinical.chronic_groups(_stream(seed, "conditions"), population, as_of)
    diagnoses = clinical.make_diagnoses(_stream(seed, "diagnoses"), encounters, groups)
    labs = clinical.make_lab_results(_stream(seed, "labs"), encounters, groups, calendar)
    medications = clinical.make_medications(_stream(seed, "medications"), encounters, groups)
    purposes: list[tuple[str, str]] = [(p.id, p.regime) for p in consortium.purposes.values()]
    writable = {i: _writable_purposes(est, consortium) for i, est in enumerate(establishments)}
    consents = clinical.make_consents(_stream(seed, "consents"), links, population, calendar, purposes, writable,
                                      deceased)

    tables = {"encounter": encounters, "diagnosis": diagnoses, "lab_result": labs, "medication": medications,
              "consent": consents}
    _assign_identifiers(_stream(seed, "identifiers"), links, tables, establishments)

    # Only records nothing refers to may carry a defect that rejects them.
    referenced_links = np.zeros(len(links), dtype=bool)
    referenced_encounters = np.zeros(len(encounters), dtype=bool)
    for dataset in ("encounter", "diagnosis", "lab_result", "medication", "consent"):
        referenced_links[tables[dataset]["_link"].to_numpy()] = True
    for dataset in ("diagnosis", "lab_result", "medication"):
        referenced_encounters[tables[dataset]["_enc"].to_numpy()] = True
    links["_leaf"] = ~referenced_links
    encounters["_leaf"] = ~referenced_encounters
    for dataset in ("diagnosis", "lab_result", "medication", "consent"):
        tables[dataset]["_leaf"] = True

    patient = links.copy()
    patient["_link"] = np.arange(len(links))
    tables["patient"] = patient
    return population, links, tables


# -------------------------------------------------------------- writing ----

def _write_file(folder: Path, dataset: str, name: str, written: WrittenFile) -> dict:
    """Write one landing file at once (a million-patient batch does not fit in memory); its manifest entry."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(written.data)
    return {"dataset": dataset, "path": name, "sha256": hashlib.sha256(written.data).hexdigest(),
            "rows": written.rows}


def _write_manifest(folder: Path, entries: list[dict], manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {**manifest, "files": entries}
    # Written last: its presence tells the pipeline the batch is complete.
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def _day(value) -> str | None:
    return None if pd.isna(value) else str(np.datetime64(value, "D"))


def generate_consortium(out_dir: Path, consortium: Consortium, patients: int, batches: int, seed: int,
                        defect_rate: float) -> GenerationSummary:
    """Write landing batches for every establishment of ``consortium`` plus the ground truth.

    ``defect_rate`` is the probability that one record carries one defect.
    """
    started = time.perf_counter()
    if patients < 1 or batches < 1:
        raise GenerationError("patients and batches must be at least 1")
    if not 0.0 <= defect_rate <= 1.0:
        raise GenerationError(f"defect_rate must be between 0 and 1, not {defect_rate}")
    out_dir = Path(out_dir)
    establishments = [consortium.establishments[key] for key in sorted(consortium.establishments)]
    calendar = Calendar(batches)
    population, links, tables = _build_tables(consortium, establishments, patients, calendar, seed)
    versions = plan_versions(_stream(seed, "timeline"), tables, calendar, defect_rate, population)

    defect_rng = _stream(seed, "defects")
    writer_rng = _stream(seed, "writers")
    truth: list[dict] = []
    consent_rows: list[dict] = []
    rows_summary: dict[str, dict[str, dict[str, int]]] = {}
    nam_sent: dict[int, str] = {}
    for index, est in enumerate(establishments):
        profile = est.input
        for batch in range(batches):
            batch_id = calendar.batch_id(batch)
            extracted_at = calendar.extracted_at(batch, index)
            folder = out_dir / "landing" / est.landing_folder / batch_id
            entries: list[dict] = []
            deleted: list[tuple[str, str]] = []
            for dataset in GENERATED_DATASETS:
                rows = versions[dataset][batch]
                rows = rows[rows["_est"].to_numpy() == index]
                rows = apply_field_defects(defect_rng, rows, dataset, extracted_at)
                if isinstance(profile, CsvProfile):
                    name = f"{dataset}.csv"
                    written = write_csv(writer_rng, rows, dataset, profile)
                else:
                    name = f"{RESOURCE_TYPES[dataset]}.ndjson"
                    written = write_ndjson(writer_rng, rows, dataset, profile, est.landing_folder)
                    gone = rows[rows["_change"].to_numpy() == CHANGE_DELETE]
                    deleted += [(RESOURCE_TYPES[dataset], ref) for ref in gone[RECORD_REF[dataset]].tolist()]
                    if written.rows == 0:
                        continue
                entries.append(_write_file(folder, dataset, name, written))
                for line, kind, resource_id in written.defects:
                    spec = D.KINDS[kind]
                    rule = spec.rule
                    if kind == D.MISSING_REQUIRED and not isinstance(profile, CsvProfile):
                        # A FHIR resource without its id, subject or code cannot be mapped at all.
                        rule = "ingest.unmapped_resource"
                    truth.append({"establishment": est.id, "batch_id": batch_id, "dataset": dataset, "file": name,
                                  "line": line, "resource_id": resource_id, "kind": kind,
                                  "expected": spec.expected, "rule": rule})
                del written  # the file is on disk: let its bytes go before the next one is built
                if dataset == "patient":
                    first = rows[rows["_change"].to_numpy() == "new"]
                    nam_sent.update(zip(first["_link"].tolist(), first["nam"].tolist()))
                if dataset == "consent":
                    consent_rows += _consent_truth(rows, links, est.id, batch_id, extracted_at, nam_sent)
            if deleted:
                entries.append(_write_file(folder, "bundle", DELETIONS_FILE,
                                           write_deletions(deleted, f"deletions-{batch_id}")))
            kind = KIND_FULL if batch == 0 else KIND_INCREMENTAL
            _write_manifest(folder, entries, {
                "establishment": est.id, "batch_id": batch_id,
                "extracted_at": extracted_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "kind": kind,
            })
            rows_summary.setdefault(est.id, {})[batch_id] = {e["dataset"]: e["rows"] for e in entries}

    truth_dir = out_dir / "ground_truth"
    _jsonl(truth_dir / "defects.jsonl", truth)
    _jsonl(truth_dir / "persons.jsonl", _persons_truth(population, links, tables["patient"], establishments,
                                                      nam_sent, calendar))
    _jsonl(truth_dir / "consents.jsonl", consent_rows)
    by_kind: dict[str, int] = {}
    for item in truth:
        by_kind[item["kind"]] = by_kind.get(item["kind"], 0) + 1
    return GenerationSummary(out_dir=out_dir, persons=patients, rows=rows_summary, defects=len(truth),
                             defects_by_kind=dict(sorted(by_kind.items())), seconds=time.perf_counter() - started,
                             batch_ids=[calendar.batch_id(b) for b in range(batches)])


def _consent_truth(rows: pd.DataFrame, links: pd.DataFrame, establishment: str, batch_id: str,
                   extracted_at, nam_sent: dict[int, str]) -> list[dict]:
    """Every consent row delivered; ``nam_valid`` says whether its patient links by NAM at that establishment."""
    out = []
    nam = links["nam"].to_numpy()
    for row in rows.to_dict("records"):
        kind = row["_defect"] or None
        out.append({
            "establishment": establishment, "batch_id": batch_id,
            "extracted_at": extracted_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "consent_ref": row["consent_ref"], "patient_ref": row["patient_ref"], "nam": nam[row["_link"]],
            "nam_valid": is_valid_nam(nam_sent.get(row["_link"], nam[row["_link"]])),
            "purpose": row["purpose"], "decision": row["decision"],
            "decision_date": _day(row["decision_date"]), "valid_from": _day(row["valid_from"]),
            "valid_until": _day(row["valid_until"]), "deleted": row["_change"] == CHANGE_DELETE,
            "change": row["_change"], "defect": kind, "expected": D.KINDS[kind].expected if kind else None,
        })
    return out


def _persons_truth(population: pd.DataFrame, links: pd.DataFrame, patient: pd.DataFrame,
                   establishments: list[Establishment], nam_sent: dict[int, str], calendar: Calendar) -> list[dict]:
    per_person: dict[int, list[dict]] = {}
    for link, row in enumerate(patient.to_dict("records")):
        sent = nam_sent.get(link, row["nam"])
        per_person.setdefault(row["_person"], []).append({
            "establishment": establishments[row["_est"]].id, "mrn": row["mrn"], "patient_ref": row["patient_ref"],
            "family_name": row["family_name"], "given_name": row["given_name"], "nam_sent": sent,
            "nam_valid": is_valid_nam(sent), "first_batch_id": calendar.batch_id(row["_batch"]),
            "phone": row["phone"], "street_address": row["street_address"], "city": row["city"],
            "postal_code": row["postal_code"], "email": row["email"] or None,
            "deceased_date": _day(row["deceased_date"]),
        })
    out = []
    for person, row in enumerate(population.to_dict("records")):
        out.append({
            "person": person, "nam": row["nam"], "nam_valid": is_valid_nam(row["nam"]),
            "family_name": row["family_name"], "given_name": row["given_name"], "sex": row["sex"],
            "birth_date": _day(row["birth_date"]), "phone": row["phone"], "email": row["email"] or None,
            "street_address": row["street_address"], "city": row["city"], "postal_code": row["postal_code"],
            "establishments": sorted(per_person.get(person, []), key=lambda e: e["establishment"]),
        })
    return out
