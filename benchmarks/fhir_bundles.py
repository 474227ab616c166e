"""FHIR transaction Bundles against the same content as Bulk NDJSON: ingest seconds per 1,000 entries.

Usage::

    .venv/bin/python -m benchmarks.fhir_bundles                  # 31 Bundles, as a Synthea export
    .venv/bin/python -m benchmarks.fhir_bundles --bundles 3 --encounters 4 --json out.json

Generates ``--bundles`` Synthea-like transaction Bundles, one patient each:
the Patient, then per encounter an Encounter, a Condition, vital signs and
labs (a blood-pressure panel with two components), a MedicationRequest, and
the resources the consortium does not collect (Procedure, DiagnosticReport,
Immunization, Claim, ExplanationOfBenefit); entries are ``POST`` with
``urn:uuid`` fullUrls and references, as Synthea writes them. The same
resources are written as a Bulk Data NDJSON export (one file per collected
type, references as ``Type/id``, the types not collected in one file the
manifest lists as ``not_collected``). Both batches are ingested with
:func:`jobs.stages.ingest.ingest_batch` into a fresh lake, in one warm Spark
session (a one-Bundle batch and its NDJSON twin are ingested first, untimed).

Prints, for each format, entries, seconds and seconds per 1,000 entries, and
the ratio Bundles / NDJSON. Every entry must be accounted for (bronze,
quarantine or not collected) or the run fails. Figures only, nothing is
asserted about time. To compare two versions of the reader, run the script
from each checkout (``python benchmarks/fhir_bundles.py`` imports the code
of the checkout it sits in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from jobs.core.settings import PROJECT_ROOT  # noqa: E402

DEFAULT_BUNDLES = 31
# Synthea's Bundles hold hundreds of entries: 1 + 25 encounters × 16 entries = 401 per patient.
DEFAULT_ENCOUNTERS = 25
BUNDLE_EST, NDJSON_EST = "bench_bundles", "bench_ndjson"
EXTRACTED_AT = "2026-11-01T02:00:00Z"
NS = uuid.UUID("6f1c1d52-0b7e-4d0e-9a51-0c7f0f0b5e11")
LOINC, SNOMED, UCUM = "http://loinc.org", "http://snomed.info/sct", "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
VITALS = [("29463-7", "kg", 60.0, 0.7), ("8302-2", "cm", 150.0, 0.9), ("39156-5", "kg/m2", 19.0, 0.3),
          ("8867-4", "/min", 58.0, 1.1), ("9279-1", "/min", 12.0, 0.2), ("2339-0", "mg/dL", 80.0, 1.7),
          ("72514-3", "{score}", 0.0, 0.1)]
CONDITIONS = [("44054006", "Diabetes"), ("38341003", "Hypertension"), ("195662009", "Acute viral pharyngitis"),
              ("10509002", "Acute bronchitis"), ("162864005", "Body mass index 30+ - obesity")]
MEDICATIONS = [("860975", "metformin 500 MG"), ("314076", "lisinopril 10 MG"), ("197361", "amlodipine 5 MG")]
# Per encounter: Encounter, Condition, 7 vitals, BP panel, MedicationRequest, 5 not collected = 16 entries.
NOT_COLLECTED = ("Procedure", "DiagnosticReport", "Immunization", "Claim", "ExplanationOfBenefit")
COLLECTED = {"Patient": "patient", "Encounter": "encounter", "Condition": "diagnosis",
             "Observation": "lab_result", "MedicationRequest": "medication"}


def say(message: str) -> None:
    print(f"[fhir-bundles] {message}", flush=True)


def _id(*parts: object) -> str:
    return str(uuid.uuid5(NS, "/".join(str(p) for p in parts)))


def patient_resources(p: int, encounters: int) -> list[dict]:
    """One Synthea-like patient's resources; references are ``urn:uuid:<id>`` as in a Synthea Bundle."""
    pid = _id("patient", p)
    subject = {"reference": f"urn:uuid:{pid}"}
    resources = [{
        "resourceType": "Patient", "id": pid,
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "MR"}]},
                        "system": "https://github.com/synthetichealth/synthea", "value": pid}],
        "name": [{"use": "official", "family": f"Family{p}", "given": [f"Given{p}"]}],
        "gender": "female" if p % 2 else "male", "birthDate": f"19{40 + p % 60:02d}-0{1 + p % 9}-1{p % 10}",
        "address": [{"line": [f"{100 + p} Main Street"], "city": "Springfield", "postalCode": "01105"}],
    }]
    for e in range(encounters):
        eid = _id("encounter", p, e)
        when = f"20{10 + e % 15:02d}-{1 + e % 12:02d}-{1 + (p + e) % 28:02d}T09:{e % 60:02d}:00Z"
        encounter = {"reference": f"urn:uuid:{eid}"}
        code, name = CONDITIONS[(p + e) % len(CONDITIONS)]
        rx, rx_name = MEDICATIONS[(p + e) % len(MEDICATIONS)]
        resources.append({
            "resourceType": "Encounter", "id": eid, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": SNOMED, "code": "185349003"}], "text": "Encounter for check up"}],
            "subject": subject, "period": {"start": when, "end": when.replace("T09:", "T10:")},
            "serviceProvider": {"reference": "urn:uuid:org-1", "display": "Springfield Clinic"}})
        resources.append({
            "resourceType": "Condition", "id": _id("condition", p, e),
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "code": {"coding": [{"system": SNOMED, "code": code, "display": name}], "text": name},
            "subject": subject, "encounter": encounter, "onsetDateTime": when, "recordedDate": when})
        for k, (loinc, unit, base, step) in enumerate(VITALS):
            resources.append({
                "resourceType": "Observation", "id": _id("observation", p, e, k), "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "vital-signs"}]}],
                "code": {"coding": [{"system": LOINC, "code": loinc}]}, "subject": subject,
                "encounter": encounter, "effectiveDateTime": when, "issued": when,
                "valueQuantity": {"value": round(base + step * ((p * 7 + e * 3 + k) % 40), 1), "unit": unit,
                                  "system": UCUM, "code": unit}})
        resources.append({
            "resourceType": "Observation", "id": _id("bp", p, e), "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "85354-9"}]}, "subject": subject,
            "encounter": encounter, "effectiveDateTime": when,
            "component": [
                {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                 "valueQuantity": {"value": 110 + (p + e) % 40, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}},
                {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                 "valueQuantity": {"value": 70 + (p + e) % 20, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}}]})
        resources.append({
            "resourceType": "MedicationRequest", "id": _id("medication", p, e), "status": "active",
            "intent": "order", "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": rx,
                                                                         "display": rx_name}]},
            "subject": subject, "encounter": encounter, "authoredOn": when})
        for rtype in NOT_COLLECTED:
            resources.append({"resourceType": rtype, "id": _id(rtype, p, e), "status": "completed",
                              "subject": subject, "patient": subject, "encounter": encounter,
                              "code": {"coding": [{"system": SNOMED, "code": "430193006"}]}})
    return resources


def _manifest(folder: Path, establishment: str, files: list[tuple[str, str, int]]) -> None:
    entries = [{"dataset": dataset, "path": name,
                "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(), "rows": rows}
               for dataset, name, rows in files]
    manifest = {"establishment": establishment, "batch_id": folder.name, "extracted_at": EXTRACTED_AT,
                "kind": "full", "files": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _relative(resources: list[dict]) -> list[dict]:
    """The resources as a Bulk export writes them: ``urn:uuid:<id>`` references become ``Type/id``."""
    types = {r["id"]: r["resourceType"] for r in resources}
    text = json.dumps(resources)
    for rid, rtype in types.items():
        text = text.replace(f'"urn:uuid:{rid}"', f'"{rtype}/{rid}"')
    return json.loads(text)


def write_batches(landing: Path, batch_id: str, patients: range, encounters: int) -> int:
    """The same patients as Bundles (one per patient) and as NDJSON; returns the entries of each."""
    bundles, ndjson = landing / BUNDLE_EST / batch_id, landing / NDJSON_EST / batch_id
    bundles.mkdir(parents=True)
    ndjson.mkdir(parents=True)
    files, by_type, entries = [], {}, 0
    for p in patients:
        resources = patient_resources(p, encounters)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": f"urn:uuid:{r['id']}", "resource": r,
             "request": {"method": "POST", "url": r["resourceType"]}} for r in resources]}
        name = f"patient-{p:04d}.json"
        (bundles / name).write_text(json.dumps(bundle, indent=2) + "\n", encoding="utf-8")
        files.append(("bundle", name, len(resources)))
        entries += len(resources)
        for r in _relative(resources):
            by_type.setdefault(COLLECTED.get(r["resourceType"], "not_collected"), []).append(r)
    _manifest(bundles, BUNDLE_EST, files)
    ndjson_files = []
    for dataset, resources in by_type.items():
        name = f"{dataset}.ndjson"
        (ndjson / name).write_text("".join(json.dumps(r) + "\n" for r in resources), encoding="utf-8")
        ndjson_files.append((dataset, name, len(resources)))
    _manifest(ndjson, NDJSON_EST, ndjson_files)
    return entries


def onboard(root: Path) -> Path:
    """A copy of the shipped configuration with the two benchmark establishments (YAML only)."""
    config = root / "config"
    shutil.copytree(PROJECT_ROOT / "config", config)
    agreements_path = config / "agreements.yaml"
    agreements = yaml.safe_load(agreements_path.read_text(encoding="utf-8"))
    for est in (BUNDLE_EST, NDJSON_EST):
        profile = {"id": est, "name": est.replace("_", " ").title(), "landing_folder": est,
                   "input": {"format": "fhir",
                             "identifier_systems": {"enterprise_mpi": ["https://github.com/synthetichealth/synthea"]}}}
        (config / "establishments" / f"{est}.yaml").write_text(yaml.safe_dump(profile, sort_keys=False),
                                                               encoding="utf-8")
        agreements["agreements"].append({"establishment": est, "datasets": ["patient", "encounter", "diagnosis",
                                                                           "lab_result", "medication"],
                                         "purposes": ["research_general"]})
    agreements_path.write_text(yaml.safe_dump(agreements, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return config


def measure(bundles: int, encounters: int, work: Path) -> dict:
    from jobs.core.config import load_consortium
    from jobs.core.lake import Lake
    from jobs.core.session import get_spark
    from jobs.core.settings import Settings
    from jobs.stages.ingest import ingest_batch

    landing, lake_root = work / "landing", work / "lake"
    config = onboard(work)
    write_batches(landing, "warm-up", range(1), 2)
    started = time.perf_counter()
    entries = write_batches(landing, "measured", range(1, bundles + 1), encounters)
    say(f"{bundles} Bundles and their NDJSON twin: {entries:,} entries each, written in "
        f"{time.perf_counter() - started:.1f} s")
    consortium = load_consortium(config)
    lake = Lake(str(lake_root))
    spark = get_spark(Settings.from_env(lake_root=str(lake_root), config_dir=str(config)),
                      app_name="affluent-fhir-bundles")
    figures: dict = {"bundles": bundles, "encounters_per_bundle": encounters, "entries": entries}
    try:
        for est in (NDJSON_EST, BUNDLE_EST):
            ingest_batch(spark, lake, landing, consortium, est, "warm-up")
        for label, est in (("ndjson", NDJSON_EST), ("bundles", BUNDLE_EST)):
            started = time.perf_counter()
            outcome = ingest_batch(spark, lake, landing, consortium, est, "measured")
            seconds = time.perf_counter() - started
            # Every entry in bronze, quarantine or not collected (ingest checks it per file; the sum too).
            accounted = (sum(outcome.bronze.values()) + sum(outcome.quarantined.values())
                         + outcome.not_collected)
            figures[label] = {"seconds": round(seconds, 2), "per_1000_entries": round(1000 * seconds / entries, 3),
                              "bronze_rows": sum(outcome.bronze.values()),
                              "quarantined": sum(outcome.quarantined.values()),
                              "not_collected": outcome.not_collected, "accounted_rows": accounted}
            say(f"{label:>8}: {entries:,} entries in {seconds:7.2f} s = {figures[label]['per_1000_entries']:.3f} s "
                f"per 1,000 entries ({figures[label]['bronze_rows']:,} bronze rows, "
                f"{figures[label]['quarantined']} quarantined, {outcome.not_collected:,} not collected)")
    finally:
        spark.stop()
    figures["ratio_bundles_to_ndjson"] = round(figures["bundles"]["seconds"] / figures["ndjson"]["seconds"], 2)
    say(f"Bundles / NDJSON: ×{figures['ratio_bundles_to_ndjson']:.2f}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.fhir_bundles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=int, default=DEFAULT_BUNDLES, help="Bundles (one patient each)")
    parser.add_argument("--encounters", type=int, default=DEFAULT_ENCOUNTERS,
                        help="encounters per patient (16 entries each)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures there as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("AFFLUENT_SHUFFLE_PARTITIONS", "2")
    with tempfile.TemporaryDirectory(prefix="fhir-bundles-") as scratch:
        work = args.work or Path(scratch)
        if args.work and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        figures = measure(args.bundles, args.encounters, work.resolve())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
