"""Coded fields hold codes: a name typed into a care site, a unit or a type never leaves bronze."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from pyspark.sql import functions as F

from jobs.core.config import ConfigError
from jobs.core.lake import BRONZE, LANDING, Lake
from jobs.core.schemas import staged_schema
from jobs.privacy.coded_fields import (
    CODED_ERROR_PREFIX,
    RULE_CODED_FIELD,
    declared_vocabulary,
    guard_coded_fields,
    unit_conforms,
)
from tests.conftest import FIXED_TODAY, TEST_KEY
from tests.landing_helpers import (
    LAURENTIDES_ENCOUNTER_HEADER,
    LAURENTIDES_PATIENT_HEADER,
    latin1_csv,
    write_batch,
)
from tests.privacy_helpers import CONSENT_HEADER, LAB_HEADER, file_text, lake_files

EST = "chu_laurentides"
BATCH = "20260105-007"
# Planted in coded fields of the delivery: each string must stay in landing and bronze.
ADDRESS_IN_CARE_SITE = "Ophélie Vautrinbourg, 88 rue Vautrinbourg"
NAME_IN_UNIT = "Séverin Pelletrault"
NAME_IN_ANNOTATION = "{Clothilde Marbrevaux}"
NAME_IN_VISIT_TYPE = "Anselme Fouquerolle"
NAME_IN_DIAGNOSIS_TYPE = "Gudule Tavernaque"
PLANTED = [ADDRESS_IN_CARE_SITE, "Vautrinbourg", NAME_IN_UNIT, "Pelletrault", "Marbrevaux", "Fouquerolle",
           "Tavernaque"]

PATIENTS = [
    "K001;TREM85521201;Tremblay;Eloise;12/02/1985;F;12 rue des Erables;Montreal;H2X 1Y4;514-555-0101;e@x.ca;;A",
    "K002;GAGL90010112;Gagnon;Luc;01/01/1990;M;3 av. du Parc;Laval;H7N 2B3;450-555-0102;l@x.ca;;A",
]
ENCOUNTERS = [
    "S1;K001;03/01/2026 08:00;04/01/2026 12:30;hospitalisation;Médecine interne;;A",  # declared: lands
    f"S2;K001;03/01/2026 08:00;;urgence;{ADDRESS_IN_CARE_SITE};;A",
    f"S3;K002;03/01/2026 08:00;;{NAME_IN_VISIT_TYPE};Urgence;;A",
    "S4;K002;03/01/2026 08:00;;urgence;URGENCE - CIVIÈRES;;A",  # declared, other case: lands
]
DIAGNOSIS_HEADER = ("no_diagnostic;no_sejour;no_dossier;code_diagnostic;systeme_code;date_diagnostic;"
                    "type_diagnostic;action")
DIAGNOSES = [
    "D1;S1;K001;E11.9;ICD10CA;03/01/2026;principal;A",
    f"D2;S1;K001;I10;ICD10CA;03/01/2026;{NAME_IN_DIAGNOSIS_TYPE};A",
]
LABS = [
    "R1;S1;K001;2345-7;5,4;mmol/L;03/01/2026 09:00;A",
    f"R2;S1;K001;2345-7;5,6;{NAME_IN_UNIT};03/01/2026 09:00;A",
    f"R3;S4;K002;2345-7;5,8;{NAME_IN_ANNOTATION};03/01/2026 09:00;A",
    "R4;S4;K002;4548-4;6,1;%;03/01/2026 09:00;A",
]
CONSENTS = [
    "C1;K001;research_general;accord;01/01/2025;01/01/2025;;A",
    "C2;K002;research_general;accord;01/01/2025;01/01/2025;;A",
]
# (dataset, record) -> the masked column of each planted row.
EXPECTED_QUARANTINE = {
    ("encounter", "S2"): "care_site_source_value",
    ("encounter", "S3"): "visit_source_value",
    ("diagnosis", "D2"): "condition_status_source_value",
    ("lab_result", "R2"): "unit_source_value",
    ("lab_result", "R3"): "unit_source_value",
}


# ------------------------------------------------------------- units ----

def test_units_conform_by_the_ucum_grammar_or_a_declaration():
    declared = frozenset({"{score}", "TAB"})
    for unit in ("mmol/L", "mg/dL", "10*9/L", "mm[Hg]", "%", "µg/L", "mL/min/{1.73_m2}", "{score}", "TAB"):
        assert unit_conforms(unit, declared | {"mL/min/{1.73_m2}"}), unit
    # UCUM annotations are free text: only declared ones pass.
    for unit in (NAME_IN_UNIT, "Pelletrault", NAME_IN_ANNOTATION, "mg/{Pelletrault}", "", "m" * 40):
        assert not unit_conforms(unit, declared), unit


# ------------------------------------------------------------- guard ----

def _staged(spark, dataset: str, rows: list[dict]):
    schema = staged_schema(dataset)
    base = {"establishment_id": EST, "_batch_id": BATCH, "_extracted_at": dt.datetime(2026, 1, 5),
            "record_action": "upsert", "_parse_errors": [], "_source_file": f"{BATCH}#0"}
    return spark.createDataFrame([{**{f.name: None for f in schema.fields}, **base, **r} for r in rows], schema)


def test_values_outside_their_vocabulary_are_masked_and_named(spark, consortium):
    vocabulary = declared_vocabulary(consortium, EST, units=["mmol/L", NAME_IN_UNIT, "{Clothilde}", "mg"])
    encounters = _staged(spark, "encounter", [
        {"visit_occurrence_id": "ok", "visit_source_value": "externe", "care_site_source_value": "Cardiologie"},
        {"visit_occurrence_id": "site", "visit_source_value": "urgence", "care_site_source_value": ADDRESS_IN_CARE_SITE},
        {"visit_occurrence_id": "type", "visit_source_value": "anselme", "care_site_source_value": None},
    ])
    out = {r.visit_occurrence_id: r for r in guard_coded_fields(encounters, "encounter", vocabulary).collect()}
    assert (out["ok"].care_site_source_value, out["ok"]._parse_errors) == ("Cardiologie", [])
    assert out["site"].care_site_source_value == f"[masked:text:{len(ADDRESS_IN_CARE_SITE)}]"
    assert out["site"]._parse_errors == [f"{CODED_ERROR_PREFIX}care_site_source_value"]
    assert (out["type"].visit_source_value, out["type"].care_site_source_value) == ("[masked:letters:7]", None)
    assert guard_coded_fields(encounters, "encounter", vocabulary).columns == encounters.columns

    labs = _staged(spark, "lab_result", [
        {"measurement_id": "ok", "measurement_source_value": "2345-7", "measurement_source_vocabulary": "LOINC",
         "unit_source_value": "mmol/L"},
        {"measurement_id": "unit", "measurement_source_value": "2345-7", "measurement_source_vocabulary": "LOINC",
         "unit_source_value": NAME_IN_UNIT},
        {"measurement_id": "code", "measurement_source_value": "Pelletrault", "measurement_source_vocabulary": "LOINC",
         "unit_source_value": "mg"},
    ])
    out = {r.measurement_id: r for r in guard_coded_fields(labs, "lab_result", vocabulary).collect()}
    assert out["ok"]._parse_errors == [] and out["ok"].unit_source_value == "mmol/L"
    assert out["unit"].unit_source_value == f"[masked:letters:{len(NAME_IN_UNIT)}]"
    assert out["code"].measurement_source_value == "[masked:letters:11]"
    assert out["code"]._parse_errors == [f"{CODED_ERROR_PREFIX}measurement_source_value"]

    # A code of no known system is kept only when code-shaped (its row is quarantined for the system).
    diagnoses = _staged(spark, "diagnosis", [
        {"condition_occurrence_id": "shaped", "condition_source_value": "X123", "condition_source_vocabulary": None},
        {"condition_occurrence_id": "name", "condition_source_value": "TAVERNAQUE",
         "condition_source_vocabulary": None, "condition_status_source_value": "principal"},
    ])
    out = {r.condition_occurrence_id: r for r in guard_coded_fields(diagnoses, "diagnosis", vocabulary).collect()}
    assert out["shaped"].condition_source_value == "X123"
    assert out["name"].condition_source_value == "[masked:letters:10]"

    meds = _staged(spark, "medication", [
        {"drug_exposure_id": "snomed", "drug_source_value": "A10BA02", "drug_source_vocabulary": "ATC",
         "route_source_value": "26643006"},
        {"drug_exposure_id": "name", "drug_source_value": "A10BA02", "drug_source_vocabulary": "ATC",
         "route_source_value": "gudule"},
    ])
    out = {r.drug_exposure_id: r for r in guard_coded_fields(meds, "medication", vocabulary).collect()}
    assert out["snomed"]._parse_errors == [] and out["name"].route_source_value == "[masked:letters:6]"


def test_without_a_declared_list_a_care_site_must_be_a_short_unit_code(spark, consortium):
    vocabulary = declared_vocabulary(consortium, "cisss_estuaire")
    unlisted = vocabulary.__class__(vocabulary.words, vocabulary.units, None)
    encounters = _staged(spark, "encounter", [
        {"visit_occurrence_id": v, "care_site_source_value": v}
        for v in ("4N", "U-07", "CLIN12", "Urgence", "Vautrinbourg", "12 rue Vautrinbourg")])
    kept = {r.visit_occurrence_id: r.care_site_source_value
            for r in guard_coded_fields(encounters, "encounter", unlisted).collect()}
    assert {k for k, v in kept.items() if v == k} == {"4N", "U-07", "CLIN12"}


def test_demo_profiles_declare_every_care_site_the_generator_writes(consortium):
    from jobs.generate.names import CARE_SITES

    written = {site.lower() for sites in CARE_SITES.values() for site in sites}
    for est in ("chu_laurentides", "hopital_riviere", "cisss_estuaire"):
        assert written <= declared_vocabulary(consortium, est).care_sites, est


def test_an_empty_care_site_list_is_refused(tmp_path):
    import shutil

    from jobs.core.config import load_consortium as load

    config = tmp_path / "config"
    shutil.copytree("config", config)
    path = config / "establishments" / "chu_laurentides.yaml"
    text = path.read_text(encoding="utf-8")
    start = text.index("care_sites:")
    path.write_text(text[:start] + "care_sites: []\n" + text[text.index("input:"):], encoding="utf-8")
    with pytest.raises(ConfigError, match="care_sites"):
        load(config)


# ------------------------------------------------------- end to end ----

def _write_delivery(landing):
    return write_batch(landing, EST, BATCH, {
        "patients.csv": ("patient", latin1_csv(LAURENTIDES_PATIENT_HEADER, PATIENTS)),
        "sejours.csv": ("encounter", latin1_csv(LAURENTIDES_ENCOUNTER_HEADER, ENCOUNTERS)),
        "diagnostics.csv": ("diagnosis", latin1_csv(DIAGNOSIS_HEADER, DIAGNOSES)),
        "resultats.csv": ("lab_result", latin1_csv(LAB_HEADER, LABS)),
        "consentements.csv": ("consent", latin1_csv(CONSENT_HEADER, CONSENTS)),
    })


def _commit_statistics(root) -> list[tuple[str, dict]]:
    """(commit file, stats) of every file added by every ``_delta_log`` commit under ``root``."""
    found = []
    for commit in sorted(root.rglob("_delta_log/*.json")):
        for line in commit.read_text(encoding="utf-8").splitlines():
            action = json.loads(line)
            stats = (action.get("add") or {}).get("stats")
            if stats:
                found.append((str(commit.relative_to(root)), json.loads(stats)))
    return found


def test_names_in_coded_fields_never_leave_bronze(spark, consortium, tmp_path):
    from jobs.privacy.keys import load_key
    from jobs.stages.ingest import ingest_batch
    from jobs.stages.land import land_batch
    from jobs.stages.pseudonymise import pseudonymise_batch
    from jobs.stages.publish import MANIFEST, publish
    from jobs.stages.validate import validate_batch

    key = load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)
    root = tmp_path / "lake"
    lake = Lake(str(root))
    _write_delivery(tmp_path / "landing")
    ingested = ingest_batch(spark, lake, tmp_path / "landing", consortium, EST, BATCH)
    pseudonymise_batch(spark, lake, consortium, key, EST, BATCH)
    validate_batch(spark, lake, consortium, EST, BATCH, ingested.kind)
    landed = land_batch(spark, lake, EST, BATCH, key.fingerprint)
    publish(spark, lake, consortium, key, dt.date.fromisoformat(FIXED_TODAY))

    # The quarantine holds each planted row under the rule, the column named, the value masked.
    rows = (spark.read.format("delta").load(lake.quarantine())
            .where((F.col("batch_id") == BATCH) & (F.col("rule") == RULE_CODED_FIELD)).collect())
    key_of = {"encounter": "visit_occurrence_id", "diagnosis": "condition_occurrence_id", "lab_result": "measurement_id"}
    assert len(rows) == len(EXPECTED_QUARANTINE)
    by_line = {(r.dataset, r.source_line): r for r in rows}
    sources = {"encounter": ENCOUNTERS, "diagnosis": DIAGNOSES, "lab_result": LABS}
    for (dataset, ref), column in EXPECTED_QUARANTINE.items():
        line = next(i for i, row in enumerate(sources[dataset], start=2) if row.startswith(f"{ref};"))
        row = by_line[(dataset, line)]
        record = json.loads(row.record_safe)
        assert row.reason.startswith(f"{column}: "), row.reason
        assert record[column].startswith("[masked:") and record[key_of[dataset]], record

    # Counts add up: every row read is landed, quarantined or a counted duplicate.
    delivered = {"patient": PATIENTS, "encounter": ENCOUNTERS, "diagnosis": DIAGNOSES, "lab_result": LABS,
                 "consent": CONSENTS}
    for dataset, rows_in in delivered.items():
        read = ingested.bronze.get(dataset, 0) + ingested.quarantined.get(dataset, 0)
        total = landed.landed.get(dataset, 0) + landed.quarantined.get(dataset, 0) + landed.duplicates.get(dataset, 0)
        assert read == total == len(rows_in), (dataset, ingested, landed)
    assert {d: n for d, n in landed.quarantined.items() if n} == {"encounter": 2, "diagnosis": 1, "lab_result": 2}
    # The declared care sites landed as sent, whatever their case.
    sites = {r[0] for r in spark.read.format("delta").load(lake.silver("encounter"))
             .select("care_site_source_value").collect()}
    assert sites == {"Médecine interne", "URGENCE - CIVIÈRES"}

    # A content scan of every file of every zone but landing and bronze (staged, validated, silver,
    # quarantine, ops, gold, the extracts, every commit, checkpoint and checksum) finds none of them.
    scanned = set()
    for path in lake_files(root, skip_zones=(LANDING, BRONZE)):
        text = file_text(path, spark)
        scanned.add(path.relative_to(root).parts[0])
        for planted in PLANTED:
            assert planted not in text, f"{planted!r} in {path.relative_to(root)}"
    assert {"staged", "validated", "silver", "quarantine", "projects", "gold"} <= scanned
    # The scan can fail: bronze, scanned the same way, holds every planted value.
    bronze_text = "".join(file_text(p, spark) for p in lake_files(root / BRONZE))
    assert all(planted in bronze_text for planted in PLANTED)

    # Statistics: tables of rows outside bronze (transient zones, silver, quarantine, the extracts, gold) keep
    # min/max of ids, dates and numbers only. Ops and the publish manifests hold no row of a delivery.
    stats = [(commit, s) for commit, s in _commit_statistics(root)
             if commit.startswith(("staged/", "validated/", "silver/", "quarantine/", "projects/", "gold/"))
             and f"/{MANIFEST}/" not in commit]
    assert any(c.startswith("projects/") for c, _ in stats) and any(c.startswith("gold/") for c, _ in stats)
    for commit, s in stats:
        for column, value in (s.get("minValues") or {}).items():
            assert not isinstance(value, str) or column.endswith("_id") or column in (
                "person_id", "patient_key") or _is_temporal(value), (commit, column)


def _is_temporal(value: str) -> bool:
    try:
        dt.datetime.fromisoformat(value)
        return True
    except ValueError:
        return False
