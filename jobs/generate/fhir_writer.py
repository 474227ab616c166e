"""Write one dataset of one batch as FHIR R4 Bulk Data NDJSON (and deletions as a Bundle).

Mapping (the one ``docs/landing-contract.md`` describes):

- Patient: ``identifier`` with the NAM (``system`` one of the profile's
  ``nam_systems``) and the MRN (``type`` v2-0203 ``MR``); name, gender,
  birthDate, address, telecom, deceasedDateTime.
- Encounter: ``class`` (v3 ActCode ``IMP``/``AMB``/``EMER``), ``period``,
  ``location[0].location.display`` (care site), ``reasonCode[0].text`` (the
  free-text admission note).
- Condition: ``code`` (ICD-10-CA), ``encounter``, ``recordedDate``,
  ``category`` (``encounter-diagnosis``) and the rank as ``category[1].text``.
- Observation: ``code`` (LOINC), ``effectiveDateTime``, ``valueQuantity`` (UCUM).
- MedicationRequest: ``medicationCodeableConcept`` (ATC or DIN), ``authoredOn``
  (start), ``dispenseRequest.validityPeriod`` (start/end), ``dosageInstruction``.
- Consent: ``status`` active (permit/deny in ``provision.type``) or inactive
  (withdrawal), ``dateTime`` (decision), ``provision.period`` (validity),
  ``provision.purpose`` (from the profile's ``purpose_codes``).

Deleted records go to one transaction Bundle per batch with ``DELETE`` entries.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from jobs import reference
from jobs.core.config import FhirProfile
from jobs.generate import defects as D
from jobs.generate.csv_writer import WrittenFile
from jobs.generate.formats import fhir_datetimes, format_instants
from jobs.generate.timeline import CHANGE_DELETE
from jobs.core.schemas import RECORD_REF

RESOURCE_TYPES = {
    "patient": "Patient", "encounter": "Encounter", "diagnosis": "Condition", "lab_result": "Observation",
    "medication": "MedicationRequest", "consent": "Consent",
}
DELETIONS_FILE = "Bundle-deletions.json"
VISIT_CLASSES = {"inpatient": ("IMP", "inpatient encounter"), "outpatient": ("AMB", "ambulatory"),
                 "emergency": ("EMER", "emergency")}
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DATE_FIELDS = ("birth_date", "deceased_date", "condition_date", "start_date", "end_date", "decision_date",
               "valid_from", "valid_until")
DATETIME_FIELDS = ("visit_start", "visit_end", "measured_at")


def mrn_system(profile_landing_folder: str) -> str:
    return f"https://{profile_landing_folder.replace('_', '-')}.example.org/mrn"


def _texts(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """Date fields as FHIR text (impossible dates printed as such), keyed by canonical name."""
    text: dict[str, np.ndarray] = {}
    for field in DATE_FIELDS:
        if field in rows:
            text[field] = format_instants(rows[field].to_numpy().astype("datetime64[D]"), "%Y-%m-%d")
    for field in DATETIME_FIELDS:
        if field in rows:
            text[field] = fhir_datetimes(rows[field].to_numpy().astype("datetime64[m]"))
    impossible = rows["_impossible"].to_numpy()
    for i in np.flatnonzero(impossible != None).tolist():  # noqa: E711 - object array
        field, year, month, day = impossible[i]
        date = f"{year:04d}-{month:02d}-{day:02d}"
        if field in DATETIME_FIELDS:
            date += text[field][i][10:] if text[field][i] else "T08:00:00-05:00"
        text[field][i] = date
    return text


def _ref(kind: str, ref: str) -> dict | None:
    return {"reference": f"{kind}/{ref}"} if ref else None


def _coding(system: str, code: str, display: str | None = None) -> dict:
    coding = {"system": reference.FHIR_SYSTEM_URIS[system], "code": code}
    if display:
        coding["display"] = display
    return coding


def _drop_empty(resource: dict) -> dict:
    return {k: v for k, v in resource.items() if v not in (None, "", [], {})}


def build_resources(rows: pd.DataFrame, dataset: str, profile: FhirProfile, landing_folder: str,
                    nam_pick: np.ndarray) -> list[dict]:
    """One FHIR resource per (non-deleted) row."""
    text = _texts(rows)
    wanted = [c for c in rows.columns if not c.startswith("_") or c == "_decimals"]
    records = rows[wanted].to_dict("records")
    out = []
    for i, row in enumerate(records):
        ref = row[RECORD_REF[dataset]]
        subject = _ref("Patient", row.get("patient_ref", ""))
        encounter = _ref("Encounter", row.get("encounter_ref", ""))
        if dataset == "patient":
            telecom = [{"system": "phone", "value": row["phone"], "use": "home"}]
            if row["email"]:
                telecom.append({"system": "email", "value": row["email"]})
            resource = {
                "resourceType": "Patient", "id": ref,
                "identifier": [
                    {"system": profile.nam_systems[int(nam_pick[i] * len(profile.nam_systems))], "value": row["nam"]},
                    {"type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "system": mrn_system(landing_folder),
                     "value": row["mrn"]},
                ],
                "name": [{"use": "official", "family": row["family_name"], "given": [row["given_name"]]}],
                "gender": row["sex"], "birthDate": text["birth_date"][i],
                "address": [{"line": [row["street_address"]], "city": row["city"], "state": "QC",
                             "postalCode": row["postal_code"], "country": "CA"}],
                "telecom": telecom, "deceasedDateTime": text["deceased_date"][i],
            }
        elif dataset == "encounter":
            code, display = VISIT_CLASSES[row["visit_type"]]
            resource = {
                "resourceType": "Encounter", "id": ref,
                "status": "finished" if text["visit_end"][i] else "in-progress",
                "class": {"system": V3_ACT_CODE, "code": code, "display": display},
                "subject": subject,
                "period": _drop_empty({"start": text["visit_start"][i], "end": text["visit_end"][i]}),
                "location": [{"location": {"display": row["care_site"]}}],
                "reasonCode": [{"text": row["admission_note"]}] if row["admission_note"] else None,
            }
        elif dataset == "diagnosis":
            code = row["condition_code"]
            known: reference.Diagnosis | reference.LabTest | reference.Drug | None = reference.icd10ca().get(code)
            resource = {
                "resourceType": "Condition", "id": ref,
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                               "code": "active"}]},
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                          "code": "encounter-diagnosis"}]}, {"text": row["diagnosis_type"]}],
                "code": ({"coding": [_coding(reference.SYSTEM_ICD10CA, code, known.display if known else None)]}
                         if code else None),
                "subject": subject, "encounter": encounter, "recordedDate": text["condition_date"][i],
            }
        elif dataset == "lab_result":
            code = row["loinc_code"]
            known = reference.loinc().get(code)
            resource = {
                "resourceType": "Observation", "id": ref, "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "laboratory"}]}],
                "code": {"coding": [_coding(reference.SYSTEM_LOINC, code, known.display if known else None)]} if code else None,
                "subject": subject, "encounter": encounter, "effectiveDateTime": text["measured_at"][i],
                "valueQuantity": {"value": round(float(row["value"]), int(row["_decimals"])), "unit": row["unit"],
                                  "system": reference.UCUM_URI, "code": row["unit"]},
            }
        elif dataset == "medication":
            code = row["drug_code"]
            known = reference.drugs().get(code)
            resource = {
                "resourceType": "MedicationRequest", "id": ref,
                "status": "active" if not text["end_date"][i] else "completed", "intent": "order",
                "medicationCodeableConcept": {"coding": [_coding(row["drug_system"], code, known.display if known else None)]}
                if code else None,
                "subject": subject, "encounter": encounter, "authoredOn": text["start_date"][i],
                "dosageInstruction": [{"route": {"text": row["route"]}, "doseAndRate": [{"doseQuantity": {
                    "value": float(row["dose"]), "unit": row["dose_unit"], "system": reference.UCUM_URI,
                    "code": row["dose_unit"]}}]}],
                "dispenseRequest": {"validityPeriod": _drop_empty({"start": text["start_date"][i],
                                                                   "end": text["end_date"][i]})},
            }
        else:
            resource = _consent(row, ref, text, i, profile)
        out.append(_drop_empty(resource))
    return out


def purpose_codings(profile: FhirProfile) -> dict[str, dict]:
    """Consortium purpose -> the profile's first ``system|code`` for it."""
    codings: dict[str, dict] = {}
    for key, purpose in profile.purpose_codes.items():
        system, _, code = key.rpartition("|")
        codings.setdefault(purpose, {"system": system, "code": code})
    return codings


def _consent(row: dict, ref: str, text: dict, i: int, profile: FhirProfile) -> dict:
    decision = row["decision"]
    provision = _drop_empty({
        "type": {"permit": "permit", "deny": "deny"}.get(decision),
        "period": _drop_empty({"start": text["valid_from"][i], "end": text["valid_until"][i]}),
        "purpose": [purpose_codings(profile)[row["purpose"]]],
    })
    return {
        "resourceType": "Consent", "id": ref, "status": "inactive" if decision == "withdraw" else "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Consent Document"}]}],
        "patient": _ref("Patient", row["patient_ref"]), "dateTime": text["decision_date"][i],
        "provision": provision,
    }


# Resources are built and serialised this many rows at a time: a resource as a dict weighs
# about ten times its JSON line, and a million-patient extract has millions of them.
CHUNK_ROWS = 50_000


def _resources_in_chunks(rows: pd.DataFrame, dataset: str, profile: FhirProfile, landing_folder: str,
                         nam_picks: np.ndarray):
    """(row position, resource) for every row, building at most ``CHUNK_ROWS`` resources at once."""
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = build_resources(rows.iloc[start:start + CHUNK_ROWS], dataset, profile, landing_folder,
                                nam_picks[start:start + CHUNK_ROWS])
        for offset, resource in enumerate(chunk):
            yield start + offset, resource


def write_ndjson(rng: np.random.Generator, rows: pd.DataFrame, dataset: str, profile: FhirProfile,
                 landing_folder: str) -> WrittenFile:
    """NDJSON bytes of the upserted rows, their line count and their defects."""
    rows = rows[rows["_change"].to_numpy() != CHANGE_DELETE]
    picks = rng.random(len(rows))
    nam_picks = rng.random(len(rows))
    kinds = rows["_defect"].to_numpy()
    refs = rows[RECORD_REF[dataset]].tolist()
    lines: list[bytes] = []
    found: list[tuple[int, str, str | None]] = []
    for i, resource in _resources_in_chunks(rows, dataset, profile, landing_folder, nam_picks):
        kind = kinds[i]
        text = json.dumps(resource, ensure_ascii=False, separators=(",", ":"))
        if kind == D.MALFORMED_LINE:
            text = D.truncated_json(text, picks[i])
        data = text.encode("utf-8")
        if kind == D.BAD_ENCODING:
            cut = data.find(b'"id":"') + len(b'"id":"')
            data = data[:cut] + D.bad_bytes("utf-8", picks[i]) + data[cut:]
        lines.append(data)
        if kind:
            if kind == D.DUPLICATE_ROW:
                lines.append(data)
            found.append((len(lines), kind, refs[i] or None))
    body = b"".join(line + b"\n" for line in lines)
    return WrittenFile(body, len(lines), found)


def write_deletions(deleted: list[tuple[str, str]], bundle_id: str) -> WrittenFile:
    """A transaction Bundle deleting ``(resource type, id)`` pairs."""
    bundle = {
        "resourceType": "Bundle", "id": bundle_id, "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": f"{kind}/{ref}"}} for kind, ref in deleted],
    }
    return WrittenFile((json.dumps(bundle, ensure_ascii=False, indent=1) + "\n").encode("utf-8"), len(deleted), [])
