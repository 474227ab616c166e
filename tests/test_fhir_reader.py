"""FHIR R4 reader: HL7 examples, NDJSON lines, Bundles; nothing dropped, nothing identifying quarantined."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter

import pytest

from tests.conftest import FHIR_FIXTURES

from jobs.core.config import FhirProfile
from jobs.readers.fhir import (
    FhirInputError,
    FileLineage,
    RULE_ENCODING,
    RULE_MALFORMED,
    RULE_UNMAPPED,
    read_fhir_bundles,
    read_fhir_file,
    read_fhir_resources,
)
from jobs.core.schemas import QUARANTINE_SCHEMA, bronze_schema

DUTCH_BSN = "urn:oid:2.16.840.1.113883.2.4.6.3"
RAMQ_NAM = "https://www.ramq.gouv.qc.ca/nam"
PURPOSE_SYSTEM = "https://affluent.example.org/purpose"
PROFILE = FhirProfile(
    format="fhir",
    nam_systems=[RAMQ_NAM, DUTCH_BSN],
    purpose_codes={
        f"{PURPOSE_SYSTEM}|research_general": "research_general",
        "http://terminology.hl7.org/CodeSystem/v3-ActReason|ETREAT": "research_general",
        "https://affluent.example.org/policy/oncology-v2": "research_oncology",
    },
)
EXPECTED_TYPES = {"Patient": 22, "Encounter": 10, "Observation": 64, "Condition": 12,
                  "MedicationRequest": 40, "Consent": 12}
# An Observation lands in lab_result (LOINC-coded) or observation (SNOMED CT, social history, survey…).
DATASETS_OF = {"Patient": {"patient"}, "Encounter": {"encounter"}, "Condition": {"diagnosis"},
               "Observation": {"lab_result", "observation"}, "MedicationRequest": {"medication"},
               "Consent": {"consent"}}


def _lineage(source_file: str) -> FileLineage:
    return FileLineage("cisss_estuaire", "20260115-001", source_file,
                       dt.datetime(2026, 1, 15, 2, 0), dt.datetime(2026, 1, 15, 3, 0))


def _types_match(frame, schema) -> bool:
    return [(f.name, f.dataType) for f in frame.schema.fields] == [(f.name, f.dataType) for f in schema.fields]


def _identifying_values(resource: dict) -> set[str]:
    """Every direct identifier of a resource: identifier values, names, telecom, addresses."""
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("value", "family", "city", "postalCode") and isinstance(value, str):
                    found.add(value)
                if key in ("given", "line") and isinstance(value, list):
                    found.update(v for v in value if isinstance(v, str))
                if key not in ("text",):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for key in ("identifier", "name", "telecom", "address", "contact"):
        walk(resource.get(key))
    return {v for v in found if len(v) >= 4}


def _quarantine_text(rows) -> str:
    """Quarantine rows as text, the SHA-256 column aside (checked on its own)."""
    return "\n".join(json.dumps({k: str(v) for k, v in r.asDict().items() if k != "resource_id_hash"})
                     for r in rows)


# ------------------------------------------------------- HL7 R4 examples ----


@pytest.fixture(scope="module")
def hl7(spark):
    paths = sorted(str(p) for p in FHIR_FIXTURES.glob("*.json") if p.name != "package.json")
    result = read_fhir_resources(spark, paths, PROFILE, _lineage("cisss_estuaire/20260115-001"))
    resources = {p.rsplit("/", 1)[-1]: json.loads(open(p, encoding="utf-8").read()) for p in paths}
    collected = {
        "result": result,
        "resources": resources,
        "bronze": {d: frame.collect() for d, frame in result.bronze.items()},
        "quarantine": result.quarantine.collect(),
        "reads": result.rows_read(),
    }
    result.unpersist()
    return collected


def _rows_of(hl7, dataset: str, file_name: str) -> dict:
    """The bronze rows of one file, by record ref."""
    ref = f"{dataset}_ref"
    return {r[ref]: r for r in hl7["bronze"][dataset] if r["_source_file"].endswith("/" + file_name)}


def _landed(hl7, dataset: str, file_name: str):
    rows = list(_rows_of(hl7, dataset, file_name).values())
    assert len(rows) == 1, f"{file_name}: {len(rows)} bronze rows"
    return rows[0]


def test_every_hl7_example_is_landed_or_quarantined_exactly_once(hl7):
    resources = hl7["resources"]
    assert Counter(r["resourceType"] for r in resources.values()) == EXPECTED_TYPES
    placed = Counter()
    per_type = Counter()
    for dataset, rows in hl7["bronze"].items():
        # An Observation with components lands several rows: the entry is placed once.
        for name in {row["_source_file"].rsplit("/", 1)[-1] for row in rows}:
            placed[name] += 1
            per_type[resources[name]["resourceType"]] += 1
        for row in rows:
            name = row["_source_file"].rsplit("/", 1)[-1]
            assert dataset in DATASETS_OF[resources[name]["resourceType"]]
            assert row["_source_line"] == 1 and row["_resource_id"] == resources[name]["id"]
    for row in hl7["quarantine"]:
        name = row["source_file"].rsplit("/", 1)[-1]
        placed[name] += 1
        per_type[resources[name]["resourceType"]] += 1
        assert row["stage"] == "ingest" and row["rule"] and row["reason"].startswith(row["source_file"] + ": ")
        assert json.loads(row["record_safe"])["resourceType"] == resources[name]["resourceType"]
    assert placed == Counter({name: 1 for name in resources})
    assert per_type == EXPECTED_TYPES
    assert sum(hl7["reads"].values()) == len(resources) == 160
    assert all(n == 1 for n in hl7["reads"].values())


def test_bronze_and_quarantine_have_the_declared_schemas(hl7):
    result = hl7["result"]
    for dataset, frame in result.bronze.items():
        assert _types_match(frame, bronze_schema(dataset)), dataset
    assert _types_match(result.quarantine, QUARANTINE_SCHEMA)


def test_patient_names_identifiers_address_and_telecom(hl7):
    row = _landed(hl7, "patient", "Patient-example.json")
    assert row["patient_ref"] == "example"
    assert row["mrn"] == "12345" and row["nam"] is None
    assert (row["family_name"], row["given_name"]) == ("Chalmers", "Peter James")  # the official name
    assert (row["birth_date"], row["sex"], row["deceased_date"]) == ("1974-12-25", "male", None)
    assert (row["street_address"], row["city"], row["postal_code"]) == ("534 Erewhon St", "PleasantVille", "3999")
    assert row["phone"] == "(03) 5555 6473" and row["email"] is None
    assert row["record_action"] == "upsert"

    row = _landed(hl7, "patient", "Patient-f001.json")
    assert row["nam"] == "738472983"  # identifier system listed in nam_systems
    assert row["email"] == "p.heuvel@gmail.com" and row["phone"] == "0648352638"
    assert _landed(hl7, "patient", "Patient-pat3.json")["deceased_date"] is not None


def test_observation_quantity_value_and_unit(hl7):
    row = _landed(hl7, "lab_result", "Observation-f001.json")
    assert (row["loinc_code"], row["value"], row["unit"]) == ("15074-8", "6.3", "mmol/L")
    assert row["patient_ref"] == "f001" and row["measured_at"] == "2013-04-02T09:30:10+01:00"
    # The number as written in the JSON, and the UCUM code rather than the display unit.
    row = _landed(hl7, "lab_result", "Observation-body-height.json")
    assert (row["value"], row["unit"]) == ("66.89999999999999", "[in_i]")
    # A SNOMED-coded quantity: its code is not a unit.
    assert _landed(hl7, "lab_result", "Observation-f203.json")["unit"] == "mmol/L"
    row = _landed(hl7, "lab_result", "Observation-bloodgroup.json")
    # valueCodeableConcept: its code with its system, a concept and never a number.
    assert (row["value"], row["value_system"], row["unit"]) == ("112144000", "SNOMED", None)
    assert _landed(hl7, "lab_result", "Observation-f001.json")["value_system"] is None
    row = _landed(hl7, "lab_result", "Observation-f202.json")  # status entered-in-error
    assert row["record_action"] == "delete" and row["value"] is None and row["lab_result_ref"] == "f202"


def test_observations_that_are_not_lab_results_land_in_observation_or_say_why(hl7):
    reasons = {r["source_file"].rsplit("/", 1)[-1]: (r["rule"], r["reason"]) for r in hl7["quarantine"]}
    # Coded in another system than LOINC (an ISO 11073 device code, SNOMED CT): observations.
    row = _landed(hl7, "observation", "Observation-656.json")
    assert (row["observation_code"], row["observation_system"], row["value"], row["unit"]) == \
        ("152584", "urn:iso:std:iso:11073:10101", "820", "cL/s")
    row = _landed(hl7, "observation", "Observation-abdo-tender.json")
    assert (row["observation_system"], row["category"], row["value"]) == ("SNOMED", "exam", "true")
    # Social history, LOINC-coded: an observation, its coded answer a concept.
    row = _landed(hl7, "observation", "Observation-secondsmoke.json")
    assert (row["observation_code"], row["category"], row["value"], row["value_system"]) == \
        ("39243-1", "social-history", "373066001", "SNOMED")
    # A local panel whose components are SNOMED-coded answers: one observation row per component.
    rows = _rows_of(hl7, "observation", "Observation-alcohol-type.json")
    assert {r["value"] for r in rows.values()} == {"35748005", "53410008", "6524003"}
    assert "valueSampledData has no observation mapping" in reasons["Observation-ekg.json"][1]
    assert "(a Group)" in reasons["Observation-herd1.json"][1]
    assert "contained resource" in reasons["Observation-1minute-apgar-score.json"][1]
    assert all(rule == RULE_UNMAPPED for rule, _ in reasons.values())


def test_observation_components_land_one_row_each_under_the_parent_ref(hl7):
    # A blood pressure panel: no value of its own, one row per LOINC-coded component.
    rows = _rows_of(hl7, "lab_result", "Observation-blood-pressure.json")
    assert {ref: (r["loinc_code"], r["value"], r["unit"]) for ref, r in rows.items()} == {
        "blood-pressure/component/0": ("8480-6", "107", "mm[Hg]"),
        "blood-pressure/component/1": ("8462-4", "60", "mm[Hg]"),
    }
    assert all(r["patient_ref"] == "example" and r["measured_at"] == "2012-09-17"
               and r["_resource_id"] == "blood-pressure" and r["record_action"] == "upsert" for r in rows.values())
    # A value of its own and LOINC-coded components: its row, then one per component.
    rows = _rows_of(hl7, "lab_result", "Observation-glasgow.json")
    assert sorted(rows) == ["glasgow", "glasgow/component/0", "glasgow/component/1", "glasgow/component/2"]
    assert (rows["glasgow"]["loinc_code"], rows["glasgow"]["value"]) == ("9269-2", "13")
    assert rows["glasgow/component/1"]["loinc_code"] == "9270-0" and rows["glasgow/component/1"]["unit"] is None
    # A component with a dataAbsentReason lands with a null value, like an Observation without one.
    rows = _rows_of(hl7, "lab_result", "Observation-blood-pressure-dar.json")
    assert {ref: r["value"] for ref, r in rows.items()} == {
        "blood-pressure-dar/component/0": "107", "blood-pressure-dar/component/1": None}


def test_medication_from_contained_medication_and_codeable_concept(hl7):
    row = _landed(hl7, "medication", "MedicationRequest-medrx0302.json")
    assert (row["drug_code"], row["drug_system"]) == ("324252006", "SNOMED")
    assert (row["patient_ref"], row["encounter_ref"]) == ("pat1", "f001")
    assert (row["start_date"], row["dose"], row["dose_unit"], row["route"]) == ("2015-01-15", "2", "TAB", "26643006")
    row = _landed(hl7, "medication", "MedicationRequest-medrx0303.json")  # timing bounds
    assert (row["start_date"], row["end_date"]) == ("2015-01-16", "2015-01-20")
    assert _landed(hl7, "medication", "MedicationRequest-medrx0308.json")["drug_system"] == "RxNorm"
    reasons = {r["source_file"].rsplit("/", 1)[-1]: r["reason"] for r in hl7["quarantine"]}
    assert "outside this resource" in reasons["MedicationRequest-medrx002.json"]
    assert "ingredients only" in reasons["MedicationRequest-medrx0322.json"]


def test_condition_encounter_and_consent(hl7):
    row = _landed(hl7, "diagnosis", "Condition-f001.json")
    assert (row["condition_code"], row["condition_system"], row["condition_date"]) == ("368009", "SNOMED", "2011-08-05")
    assert (row["patient_ref"], row["encounter_ref"], row["diagnosis_type"]) == ("f001", "f001", "439401001")
    row = _landed(hl7, "encounter", "Encounter-f203.json")
    assert (row["patient_ref"], row["visit_start"], row["visit_end"], row["visit_type"]) == (
        "f201", "2013-03-11", "2013-03-20", "IMP")
    assert row["admission_note"].startswith("The patient seems")
    assert _landed(hl7, "encounter", "Encounter-f001.json")["care_site"] == "Burgers University Medical Center"
    row = _landed(hl7, "consent", "Consent-consent-example-Emergency.json")
    assert (row["patient_ref"], row["purpose"], row["decision"], row["decision_date"]) == (
        "f001", "research_general", "permit", "2015-11-18")
    unmapped = [r for r in hl7["quarantine"] if r["dataset"] == "consent"]
    assert len(unmapped) == 11 and all("purpose_codes" in r["reason"] for r in unmapped)


def test_no_identifier_reaches_the_quarantine(hl7):
    rows = hl7["quarantine"]
    text = _quarantine_text(rows)
    for name, resource in hl7["resources"].items():
        for value in _identifying_values(resource):
            assert value not in text, f"an identifier of {name} is in the quarantine"
    for row in rows:
        rid = hl7["resources"][row["source_file"].rsplit("/", 1)[-1]]["id"]
        assert row["resource_id_hash"] == hashlib.sha256(rid.encode()).hexdigest()
        assert rid not in row["reason"].removeprefix(row["source_file"] + ": ")  # the file name aside


# ---------------------------------------------------------------- NDJSON ----


def _ndjson(tmp_path, name: str, lines: list[bytes]):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_ndjson_bad_lines_are_quarantined_with_their_line_numbers(spark, tmp_path):
    good = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1950-02-03",
            "identifier": [{"system": RAMQ_NAM, "value": "TREM50520312"}],
            "name": [{"family": "Tremblay", "given": ["Lise"]}]}
    lines = [
        json.dumps(good).encode(),                                              # 1 landed
        b"",                                                                    # 2 blank: not a record
        b'{"resourceType":"Patient","id":"p3","name":[{"family":"Gagnon"',      # 3 truncated
        b'{"resourceType":"Patient","id":"p4","name":[{"family":"B\xe9langer"}]}',  # 4 latin-1 byte
        b'{"resourceType":"Encounter","id":"e5","subject":{"reference":"Patient/p1"}}',  # 5 wrong type
        b'{"resourceType":"Patient","name":[{"family":"Cote"}]}',               # 6 no id
        b'{"resourceType":"Patient","id":"p7","name":"Ouellet"}',               # 7 name not a HumanName list
        json.dumps({**good, "id": "p8", "deceasedDateTime": "2024-05-01"}).encode(),  # 8 landed
        b'{"resourceType":"Procedure","id":"pr9","subject":{"reference":"Patient/p1"}}',  # 9 not collected
        b'{"resourceType":"Patiente","id":"p10","name":[{"family":"Roy"}]}',     # 10 not an R4 type
    ]
    path = _ndjson(tmp_path, "Patient.ndjson", lines)
    result = read_fhir_file(spark, path, "patient", PROFILE, _lineage("cisss_estuaire/b/Patient.ndjson"))

    bronze = {r["_source_line"]: r for r in result.bronze["patient"].collect()}
    assert sorted(bronze) == [1, 8]
    assert (bronze[1]["nam"], bronze[1]["family_name"], bronze[1]["_resource_id"]) == ("TREM50520312", "Tremblay", "p1")
    assert bronze[8]["deceased_date"] == "2024-05-01"
    quarantine = {r["source_line"]: r for r in result.quarantine.collect()}
    assert {n: r["rule"] for n, r in quarantine.items()} == {
        3: RULE_MALFORMED, 4: RULE_ENCODING, 5: RULE_UNMAPPED, 6: RULE_UNMAPPED, 7: RULE_MALFORMED, 10: RULE_UNMAPPED}
    assert quarantine[3]["reason"] == ("cisss_estuaire/b/Patient.ndjson line 3: "
                                       "not a JSON object: truncated or malformed JSON")
    assert "an Encounter" not in quarantine[5]["reason"] and "a Encounter in a patient file" in quarantine[5]["reason"]
    assert "has no id" in quarantine[6]["reason"]
    assert "a Patiente in a patient file" in quarantine[10]["reason"]
    assert all(r["dataset"] == "patient" and r["stage"] == "ingest" for r in quarantine.values())
    # Line 9, a Procedure, is neither landed nor quarantined: it is counted as not collected.
    assert result.rows_read() == {"cisss_estuaire/b/Patient.ndjson": 9}
    assert result.not_collected() == {"cisss_estuaire/b/Patient.ndjson": 1}
    text = _quarantine_text(quarantine.values())
    for value in ("Gagnon", "langer", "Cote", "Ouellet", "Tremblay", "TREM50520312", "Roy"):
        assert value not in text


# --------------------------------------------------------------- Bundles ----


def _bundle(tmp_path, bundle: dict, name: str = "bundle.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(bundle, indent=2), encoding="utf-8")
    return str(path)


def test_transaction_bundle_routes_entries_resolves_urns_and_deletes(spark, tmp_path):
    patient_url = "urn:uuid:7f3c2a4e-0000-4000-8000-000000000001"
    entries = [
        {"fullUrl": patient_url, "request": {"method": "PUT", "url": "Patient/p1"},
         "resource": {"resourceType": "Patient", "id": "p1", "name": [{"family": "Lavoie", "given": ["Marc"]}],
                      "identifier": [{"system": RAMQ_NAM, "value": "LAVM60010112"}]}},
        {"fullUrl": "urn:uuid:7f3c2a4e-0000-4000-8000-000000000002", "request": {"method": "POST", "url": "Encounter"},
         "resource": {"resourceType": "Encounter", "id": "e1", "status": "finished",
                      "class": {"code": "AMB"}, "subject": {"reference": patient_url},
                      "period": {"start": "2025-12-01T08:00:00-05:00"}}},
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {"resourceType": "Observation", "id": "o1", "status": "final",
                      "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                      "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
                      "effectiveDateTime": "2025-12-01T09:00:00-05:00",
                      "valueQuantity": {"value": 5.4, "unit": "mmol/L", "system": "http://unitsofmeasure.org",
                                        "code": "mmol/L"}}},
        {"request": {"method": "DELETE", "url": "Encounter/e-old"}},
        {"request": {"method": "POST", "url": "Organization"},
         "resource": {"resourceType": "Organization", "id": "org1", "name": "CISSS de l'Estuaire"}},
        {"request": {"method": "DELETE", "url": "Patient?identifier=LAVM60010112"}},
        {"request": {"method": "POST", "url": "Consent"},
         "resource": {"resourceType": "Consent", "id": "c1", "status": "inactive",
                      "patient": {"reference": "Patient/p1"}, "dateTime": "2025-12-02",
                      "policy": [{"uri": "https://affluent.example.org/policy/oncology-v2"}]}},
        {"request": {"method": "POST", "url": "Consent"},
         "resource": {"resourceType": "Consent", "id": "c2", "status": "active",
                      "patient": {"reference": "Patient/p1"}, "dateTime": "2025-12-02",
                      "provision": {"type": "deny", "purpose": [{"system": PURPOSE_SYSTEM, "code": "commercial"}]}}},
    ]
    path = _bundle(tmp_path, {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    result = read_fhir_file(spark, path, "bundle", PROFILE, _lineage("cisss_estuaire/b/bundle.json"))

    rows = {d: f.collect() for d, f in result.bronze.items()}
    assert [(r["patient_ref"], r["nam"], r["_source_line"]) for r in rows["patient"]] == [("p1", "LAVM60010112", 1)]
    encounters = {r["encounter_ref"]: r for r in rows["encounter"]}
    assert encounters["e1"]["patient_ref"] == "p1"  # urn:uuid resolved through the Bundle
    assert encounters["e-old"]["record_action"] == "delete" and encounters["e-old"]["_source_line"] == 4
    assert encounters["e-old"]["patient_ref"] is None and encounters["e-old"]["_resource_id"] == "e-old"
    (lab,) = rows["lab_result"]
    assert (lab["loinc_code"], lab["value"], lab["unit"], lab["encounter_ref"]) == ("2345-7", "5.4", "mmol/L", "e1")
    (consent,) = rows["consent"]
    assert (consent["consent_ref"], consent["purpose"], consent["decision"]) == ("c1", "research_oncology", "withdraw")
    quarantine = {r["source_line"]: r for r in result.quarantine.collect()}
    assert sorted(quarantine) == [6, 8]  # entry 5, an Organization, is not collected
    assert result.not_collected() == {"cisss_estuaire/b/bundle.json": 1}
    assert "conditional deletes" in quarantine[6]["reason"] and quarantine[6]["dataset"] == "bundle"
    assert "provision.purpose: https://affluent.example.org/purpose|commercial" in quarantine[8]["reason"]
    assert result.rows_read() == {"cisss_estuaire/b/bundle.json": len(entries)}
    text = _quarantine_text(quarantine.values())
    assert "LAVM60010112" not in text
    assert not any("Estuaire" in str(r) for frame in result.bronze.values() for r in frame.collect())


LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def _component(code: str, system: str = LOINC, **value) -> dict:
    return {"code": {"coding": [{"system": system, "code": code}]}, **value}


def _mmhg(value: float) -> dict:
    return {"valueQuantity": {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}}


def _observation(oid: str, components: list[dict], status: str = "final", **own) -> dict:
    return {"request": {"method": "PUT", "url": f"Observation/{oid}"},
            "resource": {"resourceType": "Observation", "id": oid, "status": status,
                         "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
                         "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2025-12-01T09:00:00-05:00",
                         "component": components, **own}}


def test_bundle_components_deletes_and_resources_not_collected(spark, tmp_path):
    entries = [
        _observation("bp1", [_component("8480-6", **_mmhg(120)), _component("8462-4", **_mmhg(80))]),  # 1
        _observation("ob2", [_component("8480-6", **_mmhg(118)),                                          # 2
                             _component("271649006", "http://snomed.info/sct", **_mmhg(118)),
                             _component("8478-0", valueCodeableConcept={"coding": [{"system": LOINC,
                                                                                      "code": "LA6576-8"}]})],
                     valueQuantity={"value": 72, "system": UCUM, "code": "/min"}),
        _observation("bp3", [_component("8480-6", **_mmhg(120)), _component("8462-4", **_mmhg(80))],       # 3
                     status="entered-in-error"),
        {"request": {"method": "DELETE", "url": "Observation/bp4"}},                                      # 4
        _observation("bp5", [_component("8480-6", **_mmhg(120)),                                          # 5
                             _component("8462-4", valueString="Mme Tremblay refused")]),
        _observation("bp6", [_component("8480-6", valueRange={"low": {"value": 110}, "high": {"value": 130}})]),
        {"resource": {"resourceType": "DiagnosticReport", "id": "dr7", "status": "final"}},              # 7
        {"request": {"method": "DELETE", "url": "Procedure/pr8"}},                                        # 8
        {"resource": {"resourceType": "Practitioner", "id": "pra9", "name": [{"family": "Bouchard"}]}},  # 9
        {"resource": {"resourceType": "Bundle", "type": "collection", "entry": []}},                     # 10
        {"resource": {"resourceType": "Frobnicate", "id": "f11"}},                                       # 11
        {"resource": {"resourceType": "Medication", "id": "m12", "code": {"text": "Zyrtec"}}},           # 12
    ]
    path = _bundle(tmp_path, {"resourceType": "Bundle", "type": "batch", "entry": entries})
    source = "cisss_estuaire/b/components.json"
    result = read_fhir_file(spark, path, "bundle", PROFILE, _lineage(source))

    rows = {r["lab_result_ref"]: r for r in result.bronze["lab_result"].collect()}
    assert {ref: (r["loinc_code"], r["value"], r["unit"], r["record_action"], r["_source_line"])
            for ref, r in rows.items()} == {
        "bp1/component/0": ("8480-6", "120", "mm[Hg]", "upsert", 1),
        "bp1/component/1": ("8462-4", "80", "mm[Hg]", "upsert", 1),
        "ob2": ("85354-9", "72", "/min", "upsert", 2),
        "ob2/component/0": ("8480-6", "118", "mm[Hg]", "upsert", 2),
        # component 1 is coded in SNOMED only: not a lab result.
        "ob2/component/2": ("8478-0", "LA6576-8", None, "upsert", 2),
        # entered-in-error: the Observation's row and every component's are deleted.
        "bp3": (None, None, None, "delete", 3),
        "bp3/component/0": (None, None, None, "delete", 3),
        "bp3/component/1": (None, None, None, "delete", 3),
        "bp4": (None, None, None, "delete", 4),
        # component 1 is free text: dropped (and counted), component 0 lands.
        "bp5/component/0": ("8480-6", "120", "mm[Hg]", "upsert", 5),
    }
    assert all(r["patient_ref"] == "p1" for ref, r in rows.items() if not ref.startswith(("bp3", "bp4")))
    quarantine = {r["source_line"]: r for r in result.quarantine.collect()}
    assert sorted(quarantine) == [6, 10, 11]
    assert "Observation.component[0].valueRange has no lab_result mapping" in quarantine[6]["reason"]
    assert quarantine[6]["dataset"] == "lab_result"
    assert "a Bundle inside a Bundle entry" in quarantine[10]["reason"] and quarantine[10]["dataset"] == "bundle"
    assert "Frobnicate is not a FHIR R4 resource type" in quarantine[11]["reason"]
    # Every entry is accounted for once: landed (whatever its rows), quarantined or not collected.
    (reads,) = result.file_reads().values()
    assert (reads.entries, reads.to_bronze, reads.quarantined, reads.not_collected, reads.bronze_rows,
            reads.free_text_dropped) == (12, 5, 3, 4, 10, 1)
    assert reads.not_collected_types == {"DiagnosticReport": 1, "Procedure": 1, "Practitioner": 1, "Medication": 1}
    assert len({(r["_source_file"], r["_source_line"]) for r in rows.values()}) == reads.to_bronze
    # Nothing of a resource not collected, nor of a component's free text, is kept anywhere.
    everything = _quarantine_text(quarantine.values()) + str([f.collect() for f in result.bronze.values()])
    for value in ("Tremblay", "Bouchard", "Zyrtec", "dr7", "pra9", "m12"):
        assert value not in everything


def _answer(code: str) -> dict:
    return {"valueCodeableConcept": {"coding": [{"system": LOINC, "code": code}]}}


def test_free_text_is_dropped_at_the_smallest_unit_and_a_coded_panel_lands(spark, tmp_path):
    """Synthea-shaped PRAPARE panels (93025-5): coded answers land, the free-text address component is
    dropped and counted; a panel whose only coded fact is free text is quarantined; an Observation's own
    free text is dropped when coded components remain."""
    prapare = [_component("56051-6", **_answer("LA33-6")),                         # Hispanic or Latino? No
               _component("32624-9", **_answer("LA30191-3")),                      # Race
               _component("56799-0", valueString="12 rue des Érables, Rimouski"),  # address: free text
               _component("63586-2", valueQuantity={"value": 3, "system": UCUM, "code": "{#}"})]
    entries = [
        _observation("pr1", prapare),
        _observation("pr2", [_component("56799-0", valueString="3 av. du Parc")]),
        _observation("pr3", [_component("8480-6", **_mmhg(121))], valueString="patient anxious, Mme Gagnon"),
        _observation("pr4", [], valueString="Dr Bouchard says fine"),
    ]
    for entry in entries:
        entry["resource"]["code"]["coding"][0]["code"] = "93025-5"
    path = _bundle(tmp_path, {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    result = read_fhir_file(spark, path, "bundle", PROFILE, _lineage("cisss_estuaire/b/prapare.json"))

    rows = {r["lab_result_ref"]: (r["loinc_code"], r["value"]) for r in result.bronze["lab_result"].collect()}
    assert rows == {"pr1/component/0": ("56051-6", "LA33-6"), "pr1/component/1": ("32624-9", "LA30191-3"),
                    "pr1/component/3": ("63586-2", "3"), "pr3/component/0": ("8480-6", "121")}
    quarantine = {r["source_line"]: r["reason"] for r in result.quarantine.collect()}
    assert sorted(quarantine) == [2, 4]
    assert "every LOINC-coded Observation.component is free text" in quarantine[2]
    assert "Observation.valueString is free text and is not landed" in quarantine[4]
    (reads,) = result.file_reads().values()
    assert (reads.entries, reads.to_bronze, reads.quarantined, reads.free_text_dropped) == (4, 2, 2, 2)
    everything = _quarantine_text(result.quarantine.collect()) + str(result.bronze["lab_result"].collect())
    for text in ("Érables", "Parc", "Gagnon", "Bouchard"):
        assert text not in everything


def test_unreadable_bundle_is_one_quarantined_row(spark, tmp_path):
    path = tmp_path / "broken.json"
    path.write_bytes(b'{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceTy')
    result = read_fhir_file(spark, str(path), "bundle", PROFILE, _lineage("cisss_estuaire/b/broken.json"))
    (row,) = result.quarantine.collect()
    assert row["rule"] == RULE_MALFORMED and row["source_line"] is None
    assert all(frame.count() == 0 for frame in result.bronze.values())
    assert result.rows_read() == {"cisss_estuaire/b/broken.json": 1}


def _plan_operators(frame) -> int:
    """Operators of a frame's analysed plan: one line each (a literal's size does not count)."""
    return len(frame._jdf.queryExecution().analyzed().treeString().splitlines())


def test_bundles_of_a_batch_are_read_in_one_plan_each_keeping_its_lineage(spark, tmp_path):
    """Four Bundle files in one read: lines, urn:uuid references and counts stay per file, and the
    plan is the one of a single Bundle (it does not grow with the number of files)."""
    urn = "urn:uuid:7f3c2a4e-0000-4000-8000-00000000000a"  # the same fullUrl in two Bundles

    def person(pid: str, eid: str) -> list[dict]:
        return [{"fullUrl": urn, "request": {"method": "POST", "url": "Patient"},
                 "resource": {"resourceType": "Patient", "id": pid}},
                {"request": {"method": "POST", "url": "Encounter"},
                 "resource": {"resourceType": "Encounter", "id": eid, "status": "finished", "class": {"code": "AMB"},
                              "subject": {"reference": urn}, "period": {"start": "2025-12-01T08:00:00-05:00"}}}]

    (tmp_path / "other").mkdir()
    paths = {
        _bundle(tmp_path, {"resourceType": "Bundle", "type": "transaction", "entry": person("p1", "e1")},
                "a.json"): "est/b#0",
        _bundle(tmp_path, {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Procedure", "id": "pr1", "status": "completed"}}, *person("p2", "e2")]},
                "b.json"): "est/b#1",
        _bundle(tmp_path, {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": {"resourceType": "Frobnicate", "id": "f1"}}]}, "other/a.json"): "est/b#2",
    }
    broken = tmp_path / "broken.json"
    broken.write_bytes(b'{"resourceType": "Bundle", "type": "collection", "entry": [{"resou')
    paths[str(broken)] = "est/b#3"
    result = read_fhir_bundles(spark, paths, PROFILE, _lineage("est/b#0"))

    encounters = {r["encounter_ref"]: (r["patient_ref"], r["_source_file"], r["_source_line"])
                  for r in result.bronze["encounter"].collect()}
    # Each urn:uuid resolves within its own Bundle, though both Bundles use the same fullUrl.
    assert encounters == {"e1": ("p1", "est/b#0", 2), "e2": ("p2", "est/b#1", 3)}
    patients = {(r["patient_ref"], r["_source_file"], r["_source_line"]) for r in result.bronze["patient"].collect()}
    assert patients == {("p1", "est/b#0", 1), ("p2", "est/b#1", 2)}
    quarantine = {(r["source_file"], r["source_line"]): r for r in result.quarantine.collect()}
    assert set(quarantine) == {("est/b#2", 1), ("est/b#3", None)}
    assert quarantine[("est/b#2", 1)]["reason"].startswith("est/b#2 entry 1: ")
    assert quarantine[("est/b#3", None)]["rule"] == RULE_MALFORMED
    reads = result.file_reads()
    assert {source: (r.entries, r.to_bronze, r.quarantined, r.not_collected) for source, r in reads.items()} == {
        "est/b#0": (2, 2, 0, 0), "est/b#1": (3, 2, 0, 1), "est/b#2": (1, 0, 1, 0), "est/b#3": (1, 0, 1, 0)}
    assert reads["est/b#1"].not_collected_types == {"Procedure": 1}

    first = next(iter(paths))
    one = read_fhir_bundles(spark, {first: "est/b#0"}, PROFILE, _lineage("est/b#0"))
    for dataset, frame in result.bronze.items():
        assert _plan_operators(frame) == _plan_operators(one.bronze[dataset]), dataset
    assert _plan_operators(result.quarantine) == _plan_operators(one.quarantine)
    result.unpersist()
    one.unpersist()


def test_unknown_dataset_is_refused(spark, tmp_path):
    with pytest.raises(FhirInputError, match="unknown FHIR dataset"):
        read_fhir_file(spark, str(tmp_path / "x.json"), "Patient", PROFILE, _lineage("x.json"))
    with pytest.raises(FhirInputError, match="no FHIR Bundle file"):
        read_fhir_bundles(spark, {}, PROFILE, _lineage("x.json"))


def test_condition_end_visit_reason_observation_category_and_order_dates(spark, tmp_path):
    """abatementDateTime / abatementPeriod.end give the condition's end (abatementString is no date);
    the first reasonCode's coding of a known system gives the visit reason (never its text); the
    observation-category coding gives the category, components take their Observation's; an order's
    dispenseRequest.validityPeriod gives the dispense date and, without a dosage end, the end date."""
    snomed, loinc = "http://snomed.info/sct", "http://loinc.org"
    category = "http://terminology.hl7.org/CodeSystem/observation-category"
    patient = {"reference": "Patient/p1"}
    entries = [
        {"resourceType": "Condition", "id": "c1", "subject": patient, "onsetDateTime": "2026-01-02",
         "code": {"coding": [{"system": snomed, "code": "38341003"}]}, "abatementDateTime": "2026-03-04"},
        {"resourceType": "Condition", "id": "c2", "subject": patient, "onsetDateTime": "2026-01-02",
         "code": {"coding": [{"system": snomed, "code": "44054006"}]},
         "abatementPeriod": {"start": "2026-02-01", "end": "2026-02-15"}},
        {"resourceType": "Condition", "id": "c3", "subject": patient, "onsetDateTime": "2026-01-02",
         "code": {"coding": [{"system": snomed, "code": "44054006"}]}, "abatementString": "as a child"},
        {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"}, "subject": patient,
         "period": {"start": "2026-01-02T09:00:00Z"},
         "reasonCode": [{"coding": [{"system": "http://example.org/local", "code": "R1"},
                                    {"system": snomed, "code": "38341003"}], "text": "Mme Roy, tension"}]},
        {"resourceType": "Encounter", "id": "e2", "status": "finished", "class": {"code": "AMB"}, "subject": patient,
         "period": {"start": "2026-01-02T09:00:00Z"}, "reasonCode": [{"text": "only words"}]},
        {"resourceType": "Observation", "id": "o1", "status": "final", "subject": patient,
         "effectiveDateTime": "2026-01-02T09:10:00Z",
         "category": [{"coding": [{"system": "http://example.org/local", "code": "chem"}]},
                      {"coding": [{"system": category, "code": "vital-signs"}]}],
         "code": {"coding": [{"system": loinc, "code": "85354-9"}]},
         "component": [{"code": {"coding": [{"system": loinc, "code": "8480-6"}]},
                        "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]},
        {"resourceType": "Observation", "id": "o2", "status": "final", "subject": patient,
         "effectiveDateTime": "2026-01-02T09:10:00Z", "code": {"coding": [{"system": loinc, "code": "2339-0"}]},
         "valueQuantity": {"value": 5.1, "system": "http://unitsofmeasure.org", "code": "mmol/L"}},
        {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "subject": patient,
         "authoredOn": "2026-01-02", "medicationCodeableConcept": {"coding": [{"system": snomed, "code": "376209006"}]},
         "dispenseRequest": {"validityPeriod": {"start": "2026-01-03", "end": "2026-07-02"}}},
        {"resourceType": "MedicationRequest", "id": "m2", "status": "active", "subject": patient,
         "authoredOn": "2026-01-02", "medicationCodeableConcept": {"coding": [{"system": snomed, "code": "376209006"}]},
         "dosageInstruction": [{"timing": {"repeat": {"boundsPeriod": {"end": "2026-02-02"}}}}],
         "dispenseRequest": {"validityPeriod": {"end": "2026-07-02"}}},
    ]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in entries]}
    result = read_fhir_file(spark, _bundle(tmp_path, bundle), "bundle", PROFILE, _lineage("cisss_estuaire/b/x.json"))
    assert result.quarantine.count() == 0
    bronze = {d: {r[f"{d}_ref"]: r for r in frame.collect()} for d, frame in result.bronze.items()}
    assert {k: r.condition_end_date for k, r in bronze["diagnosis"].items()} == {
        "c1": "2026-03-04", "c2": "2026-02-15", "c3": None}
    assert {k: (r.reason_code, r.reason_system) for k, r in bronze["encounter"].items()} == {
        "e1": ("38341003", "SNOMED"), "e2": (None, None)}
    assert {k: r.category for k, r in bronze["lab_result"].items()} == {"o1/component/0": "vital-signs", "o2": None}
    assert {k: (r.start_date, r.end_date, r.dispense_date) for k, r in bronze["medication"].items()} == {
        "m1": ("2026-01-02", "2026-07-02", "2026-01-03"), "m2": ("2026-01-02", "2026-02-02", None)}
