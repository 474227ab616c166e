"""Columns users expect, end to end: condition end date, medication end and dispense dates, the coded
reason of a visit and the category of an observation.

Two establishments are onboarded with YAML only: a Synthea-shaped CSV export (``STOP`` of conditions
and medications, ``REASONCODE`` of encounters, ``CATEGORY`` of observations, and the pharmacy's
first-dispense date) and a FHIR Bulk NDJSON export of the same kind of facts (``abatement[x]``,
``reasonCode``, ``Observation.category``, ``dispenseRequest.validityPeriod``). Each batch goes through
ingest, pseudonymise, validate and land; then a project asking for the new columns is published.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
import yaml
from pyspark.sql import functions as F
from pyspark.sql.types import DateType, StringType

from jobs.core.schemas import DATASETS
from tests.conftest import CONFIG_DIR, TEST_KEY
from tests.fixtures.foreign.build import mpi
from tests.landing_helpers import write_batch

CSV_EST, FHIR_EST = "clinique_synthea", "institut_fhir"
BATCH = "20261101-full"
P1, P2 = "11111111-aaaa-4aaa-8aaa-000000000001", "11111111-aaaa-4aaa-8aaa-000000000002"
E1, E2, E3, E4, E5 = (f"22222222-bbbb-4bbb-8bbb-00000000000{i}" for i in range(1, 6))
DIABETES, HYPERTENSION, DIABETES_TYPO = "44054006", "38341003", "44054007"  # the last fails its check digit

CSV_PROFILE = {
    "id": CSV_EST, "name": "Clinique Synthea", "landing_folder": CSV_EST,
    # Synthea's encounter class the visit maps do not name: declared, it lands with visit concept 0.
    "coded_values": {"visit_type": ["wellness"]},
    "input": {
        "format": "csv", "delimiter": ",", "quote": '"', "encoding": "utf-8",
        "date_format": "yyyy-MM-dd", "datetime_format": "yyyy-MM-dd'T'HH:mm:ss'Z'", "decimal_separator": ".",
        "default_action": "upsert",
        "files": {"patient": ["patients.csv"], "encounter": ["encounters.csv"], "diagnosis": ["conditions.csv"],
                  "lab_result": ["observations.csv"], "medication": ["medications.csv"]},
        "columns": {
            "patient": {"Id": "patient_ref", "BIRTHDATE": "birth_date", "GENDER": "sex"},
            "encounter": {"Id": "encounter_ref", "START": "visit_start", "STOP": "visit_end", "PATIENT": "patient_ref",
                          "ENCOUNTERCLASS": "visit_type", "REASONCODE": "reason_code"},
            "diagnosis": {"START": "condition_date", "STOP": "condition_end_date", "PATIENT": "patient_ref",
                          "ENCOUNTER": "encounter_ref", "CODE": "condition_code"},
            "lab_result": {"DATE": "measured_at", "PATIENT": "patient_ref", "ENCOUNTER": "encounter_ref",
                           "CATEGORY": "category", "CODE": "loinc_code", "VALUE": "value", "UNITS": "unit"},
            "medication": {"START": "start_date", "STOP": "end_date", "PATIENT": "patient_ref",
                           "ENCOUNTER": "encounter_ref", "CODE": "drug_code", "FIRST_DISPENSE": "dispense_date"},
        },
        "derived_ids": {"diagnosis": ["PATIENT", "ENCOUNTER", "CODE", "START"],
                        "lab_result": ["PATIENT", "ENCOUNTER", "CODE", "DATE"],
                        "medication": ["PATIENT", "ENCOUNTER", "CODE", "START"]},
        "constants": {"encounter": {"reason_system": "SNOMED"}, "diagnosis": {"condition_system": "SNOMED"},
                      "medication": {"drug_system": "RxNorm"}},
        "ignored_columns": {"patient": ["SSN"], "encounter": ["REASONDESCRIPTION"], "diagnosis": ["DESCRIPTION"],
                           "lab_result": ["DESCRIPTION", "TYPE"], "medication": ["DESCRIPTION", "DISPENSES"]},
        "person_identifiers": {"enterprise_mpi": "MPI"},
        # The establishment's own word for a laboratory result, mapped to the FHIR category code.
        "value_maps": {"sex": {"F": "female", "M": "male"}, "category": {"Biochimie": "laboratory"}},
    },
}
FHIR_PROFILE = {"id": FHIR_EST, "name": "Institut FHIR", "landing_folder": FHIR_EST,
                "input": {"format": "fhir",
                          "identifier_systems": {"enterprise_mpi": ["https://mpi.reseau-sante.example/enterprise-id"]}}}


def _csv(header: str, rows: list[str]) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode("utf-8")


def _csv_batch() -> dict[str, tuple[str, bytes]]:
    at = "2026-03-0{}T09:10:00Z".format
    return {
        "patients.csv": ("patient", _csv("Id,BIRTHDATE,SSN,MPI,GENDER", [
            f"{P1},1958-03-14,999-10-1000,{mpi(100)},F", f"{P2},1971-11-02,999-11-1037,{mpi(101)},M"])),
        "encounters.csv": ("encounter", _csv("Id,START,STOP,PATIENT,ENCOUNTERCLASS,REASONCODE,REASONDESCRIPTION", [
            f"{E1},{at(5)},{at(5)},{P1},ambulatory,{DIABETES},Diabetes",
            f"{E2},{at(6)},{at(6)},{P2},ambulatory,{DIABETES},Diabetes",
            f"{E3},{at(7)},{at(7)},{P1},outpatient,{HYPERTENSION},Hypertension",
            f"{E4},{at(8)},{at(8)},{P2},wellness,,",
            f"{E5},{at(9)},{at(9)},{P2},ambulatory,{DIABETES_TYPO},Diabetes (typo)"])),
        "conditions.csv": ("diagnosis", _csv("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION", [
            f"2026-03-05,2026-04-20,{P1},{E1},{DIABETES},Diabetes",
            f"2026-03-06,,{P2},{E2},{DIABETES},Diabetes",
            f"2026-03-07,2026-03-01,{P1},{E3},{HYPERTENSION},Resolved before it began",
            f"2026-03-08,2026/04/01,{P2},{E4},{HYPERTENSION},End date in another format"])),
        "observations.csv": ("lab_result", _csv("DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE", [
            f"{at(5)},{P1},{E1},vital-signs,8302-2,Body Height,162.5,cm,numeric",
            f"{at(5)},{P1},{E1},laboratory,2339-0,Glucose,98,mg/dL,numeric",
            f"{at(6)},{P2},{E2},Biochimie,718-7,Hemoglobin,13.6,g/dL,numeric",
            f"{at(6)},{P2},{E2},lab tests from the ward,4548-4,HbA1c,6.1,%,numeric",
            f"{at(7)},{P1},{E3},,29463-7,Body Weight,68.4,kg,numeric"])),
        "medications.csv": ("medication", _csv("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION,DISPENSES,FIRST_DISPENSE", [
            f"2026-03-05,2026-06-05,{P1},{E1},860975,metformin,3,2026-03-06",
            f"2026-03-06,,{P2},{E2},314076,lisinopril,1,",
            f"2026-03-07,2026-03-10,{P1},{E3},197361,amlodipine,1,2026-03-20"])),
    }


def _ndjson(*resources: dict) -> bytes:
    return ("\n".join(json.dumps(r) for r in resources) + "\n").encode("utf-8")


SNOMED_URI, LOINC_URI, RXNORM_URI = "http://snomed.info/sct", "http://loinc.org", "http://www.nlm.nih.gov/research/umls/rxnorm"
CATEGORY_URI = "http://terminology.hl7.org/CodeSystem/observation-category"


def _fhir_batch() -> dict[str, tuple[str, bytes]]:
    def patient(i: int) -> dict:
        return {"resourceType": "Patient", "id": f"pat-{i}", "gender": "female", "birthDate": "1966-09-09",
                "identifier": [{"system": "https://mpi.reseau-sante.example/enterprise-id", "value": mpi(200 + i)}]}

    def category(code: str) -> list[dict]:
        return [{"coding": [{"system": CATEGORY_URI, "code": code}]}]

    quantity = {"value": 128, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
    return {
        "Patient.ndjson": ("patient", _ndjson(patient(1), patient(2))),
        "Encounter.ndjson": ("encounter", _ndjson(
            {"resourceType": "Encounter", "id": "enc-1", "status": "finished", "class": {"code": "AMB"},
             "subject": {"reference": "Patient/pat-1"}, "period": {"start": "2026-05-09T10:30:00Z"},
             "reasonCode": [{"coding": [{"system": "http://example.org/local", "code": "R1"},
                                        {"system": SNOMED_URI, "code": HYPERTENSION}], "text": "High blood pressure"}]},
            {"resourceType": "Encounter", "id": "enc-2", "status": "finished", "class": {"code": "AMB"},
             "subject": {"reference": "Patient/pat-2"}, "period": {"start": "2026-05-10T10:30:00Z"}})),
        "Condition.ndjson": ("diagnosis", _ndjson(
            {"resourceType": "Condition", "id": "cond-1", "subject": {"reference": "Patient/pat-1"},
             "code": {"coding": [{"system": SNOMED_URI, "code": HYPERTENSION}]},
             "onsetDateTime": "2026-05-09", "abatementDateTime": "2026-07-01T08:00:00Z"},
            {"resourceType": "Condition", "id": "cond-2", "subject": {"reference": "Patient/pat-2"},
             "code": {"coding": [{"system": SNOMED_URI, "code": DIABETES}]},
             "onsetDateTime": "2026-05-10", "abatementPeriod": {"start": "2026-06-01", "end": "2026-06-15"}},
            {"resourceType": "Condition", "id": "cond-3", "subject": {"reference": "Patient/pat-2"},
             "code": {"coding": [{"system": SNOMED_URI, "code": HYPERTENSION}]},
             "onsetDateTime": "2026-05-10", "abatementString": "in childhood"})),
        "Observation.ndjson": ("lab_result", _ndjson(
            {"resourceType": "Observation", "id": "bp-1", "status": "final", "category": category("vital-signs"),
             "code": {"coding": [{"system": LOINC_URI, "code": "85354-9"}]}, "subject": {"reference": "Patient/pat-1"},
             "effectiveDateTime": "2026-05-09T10:40:00Z",
             "component": [{"code": {"coding": [{"system": LOINC_URI, "code": "8480-6"}]}, "valueQuantity": quantity}]},
            {"resourceType": "Observation", "id": "glu-1", "status": "final",
             "category": [{"coding": [{"system": "http://example.org/local", "code": "chem"}]},
                          *category("laboratory")],
             "code": {"coding": [{"system": LOINC_URI, "code": "2339-0"}]}, "subject": {"reference": "Patient/pat-1"},
             "effectiveDateTime": "2026-05-09T10:40:00Z",
             "valueQuantity": {"value": 98, "system": "http://unitsofmeasure.org", "code": "mg/dL"}})),
        "MedicationRequest.ndjson": ("medication", _ndjson(
            {"resourceType": "MedicationRequest", "id": "rx-1", "status": "active", "intent": "order",
             "subject": {"reference": "Patient/pat-1"}, "authoredOn": "2026-05-09",
             "medicationCodeableConcept": {"coding": [{"system": RXNORM_URI, "code": "314076"}]},
             "dispenseRequest": {"validityPeriod": {"start": "2026-05-10", "end": "2026-11-09"}}},
            {"resourceType": "MedicationRequest", "id": "rx-2", "status": "active", "intent": "order",
             "subject": {"reference": "Patient/pat-2"}, "authoredOn": "2026-05-10",
             "medicationCodeableConcept": {"coding": [{"system": RXNORM_URI, "code": "860975"}]},
             "dosageInstruction": [{"timing": {"repeat": {"boundsPeriod": {"start": "2026-05-10",
                                                                           "end": "2026-08-10"}}}}],
             "dispenseRequest": {"validityPeriod": {"start": "2026-05-11", "end": "2026-11-10"}}})),
    }


PROJECT = {
    "id": "reasons_study", "title": "Why patients come", "purpose": "research_general",
    "ethics_approval": "CER-2026-099", "valid_from": "2026-01-01", "valid_until": "2028-12-31",
    "members": ["alice.tremblay"], "establishments": [CSV_EST], "date_precision": "month",
    "relink_risk": {"k": 2, "m": 1},
    "datasets": {
        "encounter": ["visit_occurrence_id", "person_id", "visit_start_date", "visit_reason_source_value",
                      "visit_reason_source_vocabulary"],
        "diagnosis": ["condition_occurrence_id", "person_id", "condition_start_date", "condition_end_date",
                      "condition_source_value"],
        "lab_result": ["measurement_id", "person_id", "measurement_source_value", "category"],
        "medication": ["drug_exposure_id", "person_id", "drug_exposure_end_date", "drug_dispense_date"],
    },
}


@pytest.fixture(scope="module")
def landed(spark, tmp_path_factory):
    """Both batches through every stage, then a publish; the pipeline context."""
    from jobs.core.settings import Settings
    from jobs.stages import pipeline

    root = tmp_path_factory.mktemp("expected_columns")
    config = root / "config"
    shutil.copytree(CONFIG_DIR, config)
    agreements_path = config / "agreements.yaml"
    agreements = yaml.safe_load(agreements_path.read_text(encoding="utf-8"))
    for profile in (CSV_PROFILE, FHIR_PROFILE):
        (config / "establishments" / f"{profile['id']}.yaml").write_text(yaml.safe_dump(profile), encoding="utf-8")
        agreements["agreements"].append({"establishment": profile["id"], "datasets": list(DATASETS),
                                         "purposes": ["research_general"]})
    agreements_path.write_text(yaml.safe_dump(agreements, sort_keys=False), encoding="utf-8")
    (config / "projects" / "reasons_study.yaml").write_text(yaml.safe_dump(PROJECT), encoding="utf-8")
    write_batch(root / "landing", CSV_EST, BATCH, _csv_batch(), extracted_at="2026-11-01T02:00:00Z")
    write_batch(root / "landing", FHIR_EST, BATCH, _fhir_batch(), extracted_at="2026-11-01T02:00:00Z",
                has_header=False)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AFFLUENT_LAKE_ROOT": str(root / "lake"), "AFFLUENT_LANDING_ROOT": str(root / "landing"),
                            "AFFLUENT_CONFIG_DIR": str(config), "AFFLUENT_PSEUDONYM_KEY": TEST_KEY,
                            "AFFLUENT_TODAY": "2026-11-15"}.items():
            mp.setenv(name, value)
        ctx = pipeline.Context(Settings.from_env())
        ctx.__dict__["spark"] = spark
        outcomes = {est: pipeline.run_batch(ctx, est, BATCH) for est in (CSV_EST, FHIR_EST)}
        yield ctx, outcomes


def _silver(ctx, dataset: str, est: str):
    return ctx.spark.read.format("delta").load(ctx.lake.silver(dataset)).where(F.col("establishment_id") == est)


def _quarantined(ctx, est: str) -> dict[tuple[str, str], int]:
    """Quarantined rows per dataset and the column their reason names first."""
    column = F.substring_index(F.col("reason"), ":", 1).alias("column")
    rows = (ctx.spark.read.format("delta").load(ctx.lake.quarantine()).where(F.col("establishment_id") == est)
            .groupBy("dataset", column).count().collect())
    return {(r.dataset, r.column): r["count"] for r in rows}


def test_the_new_columns_are_typed_in_silver(landed):
    ctx, _ = landed
    types = {(d, f.name): f.dataType for d in ("diagnosis", "medication", "encounter", "lab_result")
             for f in _silver(ctx, d, CSV_EST).schema.fields}
    assert types[("diagnosis", "condition_end_date")] == DateType()
    assert types[("medication", "drug_exposure_end_date")] == DateType()
    assert types[("medication", "drug_dispense_date")] == DateType()
    assert types[("encounter", "visit_reason_source_value")] == StringType()
    assert types[("encounter", "visit_reason_source_vocabulary")] == StringType()
    assert types[("lab_result", "category")] == StringType()


def test_csv_columns_land_with_the_profile_date_format_and_bad_ones_are_quarantined(landed):
    ctx, outcomes = landed
    d = dt.date
    assert sorted((r.condition_start_date, r.condition_end_date) for r in _silver(ctx, "diagnosis", CSV_EST).collect()) \
        == [(d(2026, 3, 5), d(2026, 4, 20)), (d(2026, 3, 6), None)]
    assert sorted((r.drug_exposure_start_date, r.drug_exposure_end_date, r.drug_dispense_date)
                  for r in _silver(ctx, "medication", CSV_EST).collect()) == [
        (d(2026, 3, 5), d(2026, 6, 5), d(2026, 3, 6)), (d(2026, 3, 6), None, None)]
    assert sorted((r.visit_source_value, r.visit_reason_source_value, r.visit_reason_source_vocabulary)
                  for r in _silver(ctx, "encounter", CSV_EST).collect()) == [
        ("ambulatory", DIABETES, "SNOMED"), ("ambulatory", DIABETES, "SNOMED"),
        ("outpatient", HYPERTENSION, "SNOMED"), ("wellness", None, None)]
    assert sorted((r.measurement_source_value, r.category) for r in _silver(ctx, "lab_result", CSV_EST).collect()) \
        == [("2339-0", "laboratory"), ("29463-7", None), ("718-7", "laboratory"), ("8302-2", "vital-signs")]
    assert _quarantined(ctx, CSV_EST) == {
        ("diagnosis", "condition_end_date"): 2,  # before its start; not in the date format
        ("encounter", "visit_reason_source_value"): 1,  # check digit
        ("lab_result", "category"): 1,  # a word no value map gives a category
        ("medication", "drug_dispense_date"): 1,  # dispensed after the medication ended
    }
    rules = {d: v["by_rule"] for d, v in outcomes[CSV_EST]["validate"]["datasets"].items()}
    assert rules["diagnosis"] == {"conformance.date": 1, "plausibility.date_order": 1}
    assert rules["encounter"] == {"conformance.code": 1}
    assert rules["lab_result"] == {"conformance.code": 1}
    assert rules["medication"] == {"plausibility.date_order": 1}


def test_fhir_columns_land_from_abatement_reason_category_and_the_order_validity(landed):
    ctx, _ = landed
    d = dt.date
    assert sorted((r.condition_source_value, str(r.condition_end_date))
                  for r in _silver(ctx, "diagnosis", FHIR_EST).collect()) == [
        (HYPERTENSION, "2026-07-01"), (HYPERTENSION, "None"), (DIABETES, "2026-06-15")]
    assert sorted((r.drug_source_value, r.drug_exposure_end_date, r.drug_dispense_date)
                  for r in _silver(ctx, "medication", FHIR_EST).collect()) == [
        ("314076", d(2026, 11, 9), d(2026, 5, 10)), ("860975", d(2026, 8, 10), d(2026, 5, 11))]
    assert sorted((r.visit_reason_source_value or "", r.visit_reason_source_vocabulary or "")
                  for r in _silver(ctx, "encounter", FHIR_EST).collect()) == [("", ""), (HYPERTENSION, "SNOMED")]
    assert sorted((r.measurement_source_value, r.category) for r in _silver(ctx, "lab_result", FHIR_EST).collect()) \
        == [("2339-0", "laboratory"), ("8480-6", "vital-signs")]
    assert _quarantined(ctx, FHIR_EST) == {}


def test_a_project_gets_the_new_columns_at_its_precision_and_reason_codes_as_quasi_identifiers(landed):
    """The visit reason is a condition code: the same item as a diagnosis in the code-set bound. With
    k = 2 and m = 1, the diagnosis code both persons carry (as a reason and as a diagnosis) is kept;
    the reason only one person has is suppressed from the encounter extract."""
    from jobs.core.clock import today
    from jobs.stages.publish import publish

    ctx, _ = landed
    publish(ctx.spark, ctx.lake, ctx.consortium, ctx.key, today())
    extract = {d: ctx.spark.read.format("delta").load(ctx.lake.project("reasons_study", d))
               for d in PROJECT["datasets"]}
    assert set(extract["diagnosis"].columns) >= {"condition_end_date"}
    assert sorted(str(r.condition_end_date) for r in extract["diagnosis"].collect()) == ["2026-04-01", "None"]
    assert sorted(str(r.drug_dispense_date) for r in extract["medication"].collect()) == ["2026-03-01", "None"]
    assert sorted(r.category or "" for r in extract["lab_result"].collect()) == ["", "laboratory", "laboratory",
                                                                               "vital-signs"]
    reasons = sorted(r.visit_reason_source_value or "" for r in extract["encounter"].collect())
    assert reasons == ["", "", DIABETES, DIABETES]  # the rare hypertension reason suppressed; one visit had none
    figures = ctx.spark.read.format("delta").load(ctx.lake.project("reasons_study", "_manifest")) \
        .orderBy(F.col("published_at").desc()).first().relink_risk
    # Person 1: diabetes (diagnosis and reason: one item), hypertension (reason); person 2: diabetes.
    assert (figures["items"], figures["items_suppressed"]) == (3.0, 1.0)
