"""FHIR R4 resources → bronze rows and quarantine rows, one Spark pass per file or per batch of Bundles.

Three shapes of landed file are read:

- **Bulk Data NDJSON** (``dataset`` = a canonical dataset): one resource per
  line, every line of the dataset's resource type. Lines come from
  :func:`jobs.readers.lines.read_lines` (exact line numbers, raw bytes),
  are decoded strictly as UTF-8 and parsed with ``from_json``.
- **Bundle** (``dataset`` = ``"bundle"``): one JSON document whose entries are
  routed by resource type; ``_source_line`` is the entry's 1-based index. An
  entry whose ``request.method`` is ``DELETE`` deletes the record named by
  ``request.url``. References to another entry's ``fullUrl`` (``urn:uuid:…``)
  are resolved to that entry's ``Type/id`` (within the same Bundle).
  :func:`read_fhir_bundles` reads all the Bundle files of a batch in one pass
  (one scan, entries exploded once, one plan per resource type whatever the
  number of Bundles), each file keeping its own ``_source_file`` and counts.
- **Single resource** (``dataset`` = ``"resource"``, or
  :func:`read_fhir_resources` for many files at once): one pretty-printed JSON
  resource per file, as in the HL7 example package.

Bundles and single resources are read as whole files (``binaryFile``), so the
same strict UTF-8 check applies to them as to NDJSON lines, and a file that is
not JSON is quarantined instead of being read as nulls.

Every line or entry read goes to bronze (one row, or one per component of
an Observation, all with the entry's ``_source_line``), to quarantine (one
row), or is not collected (counted only): ``entries = to_bronze + quarantined +
not collected`` per file (:meth:`FhirReadResult.file_reads`). Quarantine rows
carry no identifier: the rule, a reason naming what is missing, the SHA-256 of
the resource id, and the resource's structure (its type and which R4 elements
it carried), never a value.

Mapping decisions the landing contract leaves open:

- Resources not collected: a well-formed resource (a JSON object whose
  ``resourceType`` is an R4 type, :data:`NOT_COLLECTED_TYPES`) of a type that
  maps to no dataset (DiagnosticReport, Procedure, Organization, Practitioner,
  Medication, Provenance, …), and a ``DELETE`` of such a type, is counted as
  not collected: no bronze row, no quarantine row, nothing of its content kept.
  This holds in an NDJSON file too (a collected type in another type's file
  stays quarantined). Quarantined instead: a ``resourceType`` that is not R4,
  and a Bundle inside a Bundle entry or NDJSON line (it may hold collected
  resources).
- Any resource whose ``status`` (Condition: ``verificationStatus``) is
  ``entered-in-error`` becomes a ``delete`` row: the source retracts it.
- Observation: routed per resource (components with it) to ``lab_result`` or
  ``observation`` (:func:`routes_to_observation`): an observation when a
  category is one of the profile's ``observations.categories`` (social-history,
  survey), a code one of its ``observations.codes``, or when neither it nor a
  component has a LOINC coding (a SNOMED CT observable); a lab result otherwise.
  A Bundle ``DELETE`` carries no resource to route: it deletes the lab_result
  record of its url. As a lab result, the first ``http://loinc.org`` coding
  gives ``loinc_code``; as an observation, the first coding of a known system
  (else the first) gives ``observation_code``/``observation_system``, and the
  first category code ``category``.
  ``value`` is ``valueQuantity.value`` as written (unit: the UCUM ``code``,
  else ``unit``; a non-UCUM ``code`` is not a unit), or the first code of
  ``valueCodeableConcept`` with its system in ``value_system`` (a coded answer,
  never a number; ``unknown`` when the coding names no system), or the text of
  ``valueBoolean``/``valueInteger``/``valueDateTime``/``valueTime`` (unit
  null; an observation takes no date or time as its answer and is quarantined
  like a Range). An observation's ``valueString`` is its value only when it is
  one of the profile's ``observations.answers`` (the closed list). Quarantined: ``valueString``
  (free text, which must not reach silver);
  ``valueRange``/``valueRatio``/``valueSampledData``/``valuePeriod``. A LOINC
  Observation with no value at all (an ordered panel, a cancelled test with a
  ``dataAbsentReason``) lands with a null value.
- Observation components (a blood pressure panel, 85354-9: 8480-6 systolic,
  8462-4 diastolic): each component with a LOINC coding is one more
  ``lab_result`` row, its ``loinc_code`` and value mapped as above (a
  component with a ``dataAbsentReason`` lands with a null value), its
  subject, encounter and time the Observation's. Its ``lab_result_ref`` is
  ``<Observation id>/component/<index>``, the 0-based position in
  ``Observation.component`` (as in FHIRPath ``component[0]``), so a new
  version of the resource updates the same rows. The Observation's own row
  (ref ``<id>``) exists when it has a value of its own or no component; a
  panel with only components lands its components. Components without a
  LOINC coding are not lab results and are not landed (like the elements the
  reader does not map); an Observation that leaves no row at all is
  quarantined (no LOINC coding on the Observation, or on none of its
  components), and so is one whose LOINC component carries an unmapped
  value[x]. Free text is dropped at the smallest unit: a LOINC component
  whose value is ``valueString`` (a PRAPARE panel's "What address do you live
  at?") is left out and counted (``FileReads.free_text_dropped``, the batch
  log's message) while its coded siblings land; the Observation's own
  ``valueString`` likewise when coded components remain. Only an Observation
  whose every coded fact is free text is quarantined.
- Retracting an Observation with components: ``entered-in-error`` deletes the
  Observation's row and one row per component of the retracted version
  (``<id>/component/0`` … whatever their coding). Limitation: a Bundle
  ``DELETE`` entry names ``Observation/<id>`` only, so it deletes the row
  ``<id>`` and cannot reach the component rows; nor does a new version with
  fewer components delete the rows of the components it dropped. Silver keys
  records by a keyed hash of the ref, so land cannot match ``<id>/component/*``
  from the parent; establishments must retract panels with ``entered-in-error``
  (or send every component again) until silver carries the parent's key.
- Condition: the first coding of a known system (ICD-10-CA, ICD-10, SNOMED),
  else the first coding; a Condition coded only as text is quarantined.
  ``condition_date`` is ``onsetDateTime``, ``onsetPeriod.start``, else
  ``recordedDate`` (``onsetAge``/``onsetString`` are not dates);
  ``condition_end_date`` is ``abatementDateTime``, else ``abatementPeriod.end``
  (``abatementAge``/``abatementString`` are not dates).
- Observation ``category``: the code of the first ``observation-category``
  coding (``laboratory``, ``vital-signs``, ``survey``…), else the first coded
  category; a component row takes its Observation's.
- MedicationRequest: a ``medicationReference`` to a Medication outside the
  resource cannot be resolved from one file and is quarantined; dose from
  ``doseQuantity`` only (``doseRange`` leaves it null); ``route`` is the first
  route code. ``end_date`` is the dosage's ``timing.repeat.boundsPeriod.end``,
  else ``dispenseRequest.validityPeriod.end``. ``dispense_date`` is
  ``dispenseRequest.validityPeriod.start``, the first day the order may be
  dispensed: an order records no dispense (``initialFill`` has a quantity
  and a duration, no date), and MedicationDispense, whose ``whenHandedOver``
  is the dispense itself, is not collected.
- Encounter: ``care_site`` is ``serviceProvider.display``, else the first
  location's display; ``admission_note`` joins the ``reasonCode`` texts;
  ``reason_code``/``reason_system`` are the first ``reasonCode``'s coding (of
  a known system first), a code and never its text.
- Consent: the purpose comes from ``provision.purpose`` codings
  (``system|code``) and ``policy.uri`` (the URI itself) looked up in
  ``purpose_codes``; none mapped, or several different purposes, is
  quarantined (applying one of several purposes would misapply the decision).
  ``draft``/``proposed`` are not decisions yet and are quarantined.
- A reference must name a Patient (``Patient/id``, absolute or with
  ``_history``); a contained subject (``#id``) or a Group is quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Callable, Iterable, Mapping, Sequence

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.core.config import FhirProfile, ObservationRouting
from jobs.readers.csv import RULE_ENCODING, RULE_MALFORMED, STAGE_INGEST, FileLineage, identifiers_json
from jobs.readers.fhir_schema import (
    BUNDLE,
    CODEABLE_CONCEPT,
    CORRUPT_FIELD,
    JSON_OPTIONS,
    KNOWN_ELEMENTS,
    OBSERVATION_VALUE_TEXT,
    OBSERVATION_VALUE_UNMAPPED,
    R4_RESOURCE_TYPES,
    RESOURCE_ENVELOPE,
    RESOURCE_SCHEMAS,
)
from jobs.readers.lines import decode_strict, read_lines
from jobs.reference.vocabularies import BY_VOCABULARY, NAMES_BY_FHIR_URI, UCUM_URI
from jobs.core.schemas import (
    ACTION_DELETE,
    ACTION_UPSERT,
    BRONZE_COLUMNS,
    DATASETS,
    PERSON_IDENTIFIERS,
    QUARANTINE_SCHEMA,
    RECORD_REF,
    bronze_schema,
)

RULE_UNMAPPED = "ingest.unmapped_resource"

# Values of ``dataset`` besides the canonical ones.
DATASET_BUNDLE = "bundle"
DATASET_RESOURCE = "resource"

BUNDLE_TYPES = ("transaction", "batch", "collection", "searchset")
METHOD_DELETE = "DELETE"
# A component's row: ``lab_result_ref`` is ``<Observation id>/component/<0-based index>``.
COMPONENT_PART = "/component/"
STATUS_ENTERED_IN_ERROR = "entered-in-error"

LAB_RESULT = "lab_result"
OBSERVATION = "observation"
# The value_system of a coded answer whose coding names no system: still a concept, never a number.
UNKNOWN_SYSTEM = "unknown"
# An Observation lands in lab_result or in observation, routed per resource (routes_to_observation).
OBSERVATION_DATASETS = (LAB_RESULT, OBSERVATION)

RESOURCE_DATASETS = {
    "Patient": "patient",
    "Encounter": "encounter",
    "Condition": "diagnosis",
    "Observation": "lab_result",
    "MedicationRequest": "medication",
    "Consent": "consent",
}
DATASET_RESOURCES = {dataset: rtype for rtype, dataset in RESOURCE_DATASETS.items()}
DATASET_RESOURCES[OBSERVATION] = "Observation"
BUNDLE_TYPE = "Bundle"
# R4 resource types the consortium does not collect. A Bundle is not among them: a
# nested Bundle may hold collected resources, so it is quarantined rather than skipped.
NOT_COLLECTED_TYPES = frozenset(R4_RESOURCE_TYPES - set(RESOURCE_DATASETS) - {BUNDLE_TYPE})
# Marks, inside the classification, an entry that is counted as not collected.
_NOT_COLLECTED = "not_collected"

LOINC_URI = BY_VOCABULARY["LOINC"].uris[0]
OBSERVATION_CATEGORY_URI = "http://terminology.hl7.org/CodeSystem/observation-category"
MRN_TYPE_CODE = "MR"  # v2-0203 identifier type: medical record number
# FHIR code-system URIs → the short names the CSV extracts use (jobs.reference.vocabularies).
CODE_SYSTEMS = dict(NAMES_BY_FHIR_URI)

_ID = r"[A-Za-z0-9.\-]{1,64}"
# Resource types a subject or patient reference may wrongly name; echoed in reasons.
_SUBJECT_TYPES = ("Group", "Device", "Location", "Organization", "Practitioner", "PractitionerRole",
                  "RelatedPerson", "Medication", "Substance", "Specimen", "Encounter", "Person")
_TYPE_NAME = r"^[A-Z][A-Za-z]{1,63}$"
_CODE_TOKEN = r"^[a-z][a-z\-]{0,31}$"
_BLANK = r"^\s*$"


class FhirInputError(ValueError):
    """The caller asked for something the reader cannot do (unknown dataset, no file)."""


@dataclass(frozen=True)
class FileReads:
    """How the entries of one file were read: ``entries = to_bronze + quarantined + not_collected``.

    ``entries`` counts NDJSON lines (blank lines excepted, as in the manifest),
    Bundle entries or single-resource files. ``bronze_rows`` is at least
    ``to_bronze``: an Observation with components gives several rows.
    ``not_collected_types`` counts the not-collected entries by resource type.
    """

    entries: int = 0
    to_bronze: int = 0
    quarantined: int = 0
    not_collected: int = 0
    bronze_rows: int = 0
    not_collected_types: dict[str, int] = field(default_factory=dict)
    # Free-text parts (an Observation component's valueString) left out of entries that landed.
    free_text_dropped: int = 0


@dataclass(frozen=True)
class FhirReadResult:
    """A read FHIR file: bronze rows per dataset, ingest quarantine rows, what was read per file.

    ``reads`` has one row per source file and not-collected resource type
    (null for the collected and quarantined entries): ``(source_file,
    not_collected_type, entries, to_bronze, quarantined, not_collected,
    bronze_rows)``; :meth:`file_reads` sums it per file. By construction, per
    file, ``entries = to_bronze + quarantined + not_collected``, where ``to_bronze``
    counts the entries that reached bronze: the distinct ``(_source_file,
    _source_line)`` of the bronze rows.
    """

    bronze: dict[str, DataFrame]
    quarantine: DataFrame
    reads: DataFrame
    _cached: DataFrame | None = field(default=None, repr=False, compare=False)

    def file_reads(self) -> dict[str, FileReads]:
        """What was read per source file (runs one small Spark job)."""
        totals: dict[str, dict] = {}
        for r in self.reads.collect():
            t = totals.setdefault(r["source_file"], {"entries": 0, "to_bronze": 0, "quarantined": 0,
                                                     "not_collected": 0, "bronze_rows": 0,
                                                     "not_collected_types": {}, "free_text_dropped": 0})
            for name in ("entries", "to_bronze", "quarantined", "not_collected", "bronze_rows",
                         "free_text_dropped"):
                t[name] += r[name] or 0
            if r["not_collected_type"] is not None:
                t["not_collected_types"][r["not_collected_type"]] = r["not_collected"]
        return {source: FileReads(**t) for source, t in totals.items()}

    def rows_read(self) -> dict[str, int]:
        """Entries read per source file: the manifest's ``rows`` (runs one small Spark job)."""
        return {source: reads.entries for source, reads in self.file_reads().items()}

    def not_collected(self) -> dict[str, int]:
        """Entries not collected per source file (runs one small Spark job)."""
        return {source: reads.not_collected for source, reads in self.file_reads().items()}

    def unpersist(self) -> None:
        """Unpersist the parsed rows kept for bronze, quarantine and counts; call once all are written.

        They are a local checkpoint: its rows go with the last frame that refers to it (Spark Connect: at
        the stage's end, :mod:`jobs.core.checkpoints`; in-process: Spark's cleaner)."""
        if self._cached is not None:
            self._cached.unpersist()


# --------------------------------------------------------------- helpers ----


def _first(array: Column) -> Column:
    """First element, or null for a null or empty array (ANSI-safe)."""
    return F.try_element_at(array, F.lit(1))


def _first_where(array: Column, predicate: Callable[[Column], Column]) -> Column:
    return _first(F.filter(array, predicate))


def _blank_to_null(column: Column) -> Column:
    return F.when(~column.rlike(_BLANK), column)


def _lookup(mapping: dict[str, str], key: Column) -> Column:
    if not mapping:
        return F.lit(None).cast("string")
    table = F.create_map(*[F.lit(x) for pair in mapping.items() for x in pair])
    return F.try_element_at(table, key)


def _short_system(system: Column) -> Column:
    return F.coalesce(_lookup(CODE_SYSTEMS, system), system)


def _preferred_coding(concept: Column) -> Column:
    """First coding of a known system, else the first coding."""
    known = list(CODE_SYSTEMS)
    return F.coalesce(
        _first_where(concept["coding"], lambda c: c["system"].isin(known) & c["code"].isNotNull()),
        _first(concept["coding"]),
    )


def _unit(quantity: Column) -> Column:
    """UCUM code when the quantity is UCUM-coded, else the human unit."""
    ucum = quantity["system"].isNull() | (quantity["system"] == UCUM_URI)
    return F.when(ucum, F.coalesce(quantity["code"], quantity["unit"])).otherwise(
        F.coalesce(quantity["unit"], quantity["code"]))


def _safe_token(column: Column, pattern: str, fallback: str) -> Column:
    """A value echoed into a reason only when it is a code, never free text."""
    return F.when(column.rlike(pattern), column).when(column.isNotNull(), F.lit(fallback))


def _reference_id(reference: Column, resource_type: str) -> Column:
    """``Type/id`` (relative, absolute, or ``…/_history/v``) → ``id``; anything else → null."""
    pattern = rf"^(?:.*/)?{resource_type}/({_ID})(?:/_history/{_ID})?$"
    return F.nullif(F.regexp_extract(F.coalesce(reference, F.lit("")), pattern, 1), F.lit(""))


@dataclass(frozen=True)
class _Mapping:
    """How one resource type becomes one dataset's columns.

    ``columns`` are the dataset's bronze columns except the record ref and
    ``record_action``; ``checks`` are (failed, reason) pairs tried in order on
    upserts; ``retracted`` says the source withdrew the resource.
    """

    columns: dict[str, Column]
    checks: list[tuple[Column, Column]]
    retracted: Column
    # Several rows from one resource: an array of structs ``(_part, <columns>)``
    # whose ``_part`` is appended to the record ref (null: the resource's own
    # row). ``None``: one row, of ``columns``.
    rows: Column | None = None
    # Free-text parts left out of a resource that otherwise lands (counted in the batch log).
    free_text_dropped: Column | None = None


def _patient_checks(reference: Column, patient_ref: Column, element: str) -> list[tuple[Column, Column]]:
    target = F.regexp_extract(F.coalesce(reference, F.lit("")), r"([A-Z][A-Za-z]{1,63})/[^/]+$", 1)
    target = F.when(target.isin(list(_SUBJECT_TYPES)), target)
    return [
        (reference.isNull(), F.lit(f"no {element} reference")),
        (reference.startswith("#"),
         F.lit(f"{element} is a contained resource, which has no record of its own")),
        (patient_ref.isNull(),
         F.concat(F.lit(f"{element} does not reference a Patient"),
                  F.coalesce(F.concat(F.lit(" (a "), target, F.lit(")")), F.lit("")))),
    ]


def _of_system(uris: list[str]) -> Callable[[Column], Column]:
    """An identifier of one of ``uris`` with a value. A one-argument function: Spark passes a
    second argument (the element's index) to a two-argument one."""
    return lambda i: i["system"].isin(uris) & i["value"].isNotNull()


def _map_patient(r: Column, profile: FhirProfile, resolve) -> _Mapping:
    nam_systems = list(profile.nam_systems)
    identifiers = r["identifier"]
    nam = _first_where(identifiers, lambda i: i["system"].isin(nam_systems) & i["value"].isNotNull())
    mrn = _first_where(identifiers, lambda i: F.exists(
        i["type"]["coding"], lambda c: c["code"] == MRN_TYPE_CODE) & i["value"].isNotNull())
    # Other linkage identifiers, {system: value} (the first value of each system's URIs), as JSON.
    person_identifiers = identifiers_json({system: _first_where(identifiers, _of_system(list(uris)))["value"]
                                           for system, uris in profile.identifier_systems.items()})
    name = F.coalesce(_first_where(r["name"], lambda n: n["use"] == "official"), _first(r["name"]))
    address = F.coalesce(_first_where(r["address"], lambda a: a["use"] == "home"), _first(r["address"]))

    def telecom(system: str) -> Column:
        return _first_where(r["telecom"], lambda t: (t["system"] == system) & t["value"].isNotNull()
                            & (t["use"].isNull() | (t["use"] != "old")))["value"]

    return _Mapping(
        columns={
            "mrn": mrn["value"],
            "nam": nam["value"],
            "family_name": name["family"],
            "given_name": _blank_to_null(F.array_join(name["given"], " ")),
            "birth_date": r["birthDate"],
            "sex": r["gender"],
            "street_address": _blank_to_null(F.array_join(address["line"], ", ")),
            "city": address["city"],
            "postal_code": address["postalCode"],
            "phone": telecom("phone"),
            "email": telecom("email"),
            "deceased_date": r["deceasedDateTime"],
            PERSON_IDENTIFIERS: person_identifiers,
        },
        checks=[],
        retracted=F.lit(False),
    )


def _map_encounter(r: Column, profile: FhirProfile, resolve) -> _Mapping:
    subject = resolve(r["subject"]["reference"])
    patient_ref = _reference_id(subject, "Patient")
    # The first reason's coding (of a known system first); its text stays in admission_note, in bronze.
    reason = _preferred_coding(_first(r["reasonCode"]))
    return _Mapping(
        columns={
            "patient_ref": patient_ref,
            "visit_start": r["period"]["start"],
            "visit_end": r["period"]["end"],
            "visit_type": r["class"]["code"],
            "care_site": F.coalesce(r["serviceProvider"]["display"], _first(r["location"])["location"]["display"]),
            "admission_note": _blank_to_null(F.array_join(F.transform(r["reasonCode"], lambda c: c["text"]), "; ")),
            "reason_code": reason["code"],
            "reason_system": _short_system(reason["system"]),
        },
        checks=_patient_checks(r["subject"]["reference"], patient_ref, "subject"),
        retracted=r["status"] == STATUS_ENTERED_IN_ERROR,
    )


def _map_condition(r: Column, profile: FhirProfile, resolve) -> _Mapping:
    patient_ref = _reference_id(resolve(r["subject"]["reference"]), "Patient")
    coding = _preferred_coding(r["code"])
    return _Mapping(
        columns={
            "encounter_ref": _reference_id(resolve(r["encounter"]["reference"]), "Encounter"),
            "patient_ref": patient_ref,
            "condition_code": coding["code"],
            "condition_system": _short_system(coding["system"]),
            "condition_date": F.coalesce(r["onsetDateTime"], r["onsetPeriod"]["start"], r["recordedDate"]),
            "condition_end_date": F.coalesce(r["abatementDateTime"], r["abatementPeriod"]["end"]),
            "diagnosis_type": _first(_first(r["category"])["coding"])["code"],
        },
        checks=[
            *_patient_checks(r["subject"]["reference"], patient_ref, "subject"),
            (coding["code"].isNull(), F.lit("Condition.code has no coding (text only)")),
        ],
        retracted=F.exists(r["verificationStatus"]["coding"],
                           lambda c: c["code"] == STATUS_ENTERED_IN_ERROR),
    )


def _loinc(concept: Column) -> Column:
    return _first_where(concept["coding"], lambda c: (c["system"] == LOINC_URI) & c["code"].isNotNull())


def _observation_value(r: Column, unmapped_names: Sequence[str] = OBSERVATION_VALUE_UNMAPPED,
                       answers: dict[str, str] | None = None) -> tuple[Column, Column, Column, Column, Column]:
    """``(value, unit, has_value, unmapped value[x] name, value system)`` of an Observation or of one
    of its components. A coded answer is its first code with that code's system (``value_system``);
    a ``valueString`` is a value only when it is one of ``answers`` (folded → as declared)."""
    quantity = r["valueQuantity"]
    answer = (_lookup(answers, F.lower(F.trim(r["valueString"]))) if answers else F.lit(None).cast("string"))
    coding = _first(r["valueCodeableConcept"]["coding"])
    value = F.coalesce(
        quantity["value"],
        coding["code"],
        *[r[name] for name in OBSERVATION_VALUE_TEXT if name not in unmapped_names],
        answer,
    )
    value_system = F.when(quantity.isNull() & coding["code"].isNotNull(),
                          F.coalesce(_short_system(coding["system"]), F.lit(UNKNOWN_SYSTEM)))
    has_value = quantity.isNotNull() | r["valueCodeableConcept"].isNotNull() | reduce(
        lambda a, b: a | b, [r[n].isNotNull() for n in OBSERVATION_VALUE_TEXT + OBSERVATION_VALUE_UNMAPPED])
    unmapped = F.coalesce(*[F.when(r[n].isNotNull(), F.lit(n)) for n in unmapped_names if n != "valueString"])
    return value, F.when(quantity.isNotNull(), _unit(quantity)), has_value, unmapped, value_system


def routes_to_observation(r: Column, routing: ObservationRouting) -> Column:
    """Whether an Observation is an observation (silver ``observation``) rather than a lab result.

    It is when a code of ``Observation.code`` (``code`` or ``system|code``) is listed in the
    profile's ``observations.codes``, when one of its categories is listed in
    ``observations.categories`` (social-history and survey by default), or when neither it nor any
    of its components has a LOINC coding (a SNOMED CT observable: visual acuity, a score).
    """
    codings = F.coalesce(r["code"]["coding"], F.array())
    listed = (F.exists(codings, lambda c: c["code"].isin(routing.codes)
                       | F.concat_ws("|", c["system"], c["code"]).isin(routing.codes)
                       | F.concat_ws("|", _short_system(c["system"]), c["code"]).isin(routing.codes))
              if routing.codes else F.lit(False))
    categories = F.flatten(F.transform(F.coalesce(r["category"], F.array()),
                                       lambda c: F.coalesce(c["coding"]["code"], F.array())))
    in_category = (F.exists(categories, lambda code: code.isin(routing.categories))
                   if routing.categories else F.lit(False))
    loinc = _loinc(r["code"]).isNotNull() | F.exists(F.coalesce(r["component"], F.array()),
                                                      lambda c: _loinc(c["code"]).isNotNull())
    return F.coalesce(listed, F.lit(False)) | F.coalesce(in_category, F.lit(False)) | ~F.coalesce(loinc, F.lit(False))


def _map_observation(r: Column, profile: FhirProfile, resolve, target: str = LAB_RESULT) -> _Mapping:
    """An Observation as ``lab_result`` rows (LOINC codes) or ``observation`` rows (any coding)."""
    is_lab = target == LAB_RESULT
    answers = None if is_lab else profile.observations.answer_lookup()
    # An observation's date or time value is no answer it can hold: quarantined like a Range.
    unmapped_names = OBSERVATION_VALUE_UNMAPPED if is_lab else (*OBSERVATION_VALUE_UNMAPPED, "valueDateTime",
                                                                 "valueTime")
    what = "LOINC" if is_lab else "observation"

    def code_of(concept: Column) -> Column:
        if is_lab:
            return _loinc(concept)
        preferred = _preferred_coding(concept)
        return F.when(preferred["code"].isNotNull(), preferred)

    def value_of(x: Column):
        return _observation_value(x, unmapped_names, answers)

    def free_text(x: Column) -> Column:
        """A valueString that is not one of the closed list's answers: possibly free text."""
        if answers:
            return x["valueString"].isNotNull() & _lookup(answers, F.lower(F.trim(x["valueString"]))).isNull()
        return x["valueString"].isNotNull()

    def fact_columns(coding: Column, value: Column, unit: Column, value_system: Column) -> dict[str, Column]:
        if is_lab:
            return {"loinc_code": coding["code"], "value": value, "unit": unit, "measured_at": measured_at,
                    "value_system": value_system, "category": category}
        return {"observation_code": coding["code"], "observation_system": _short_system(coding["system"]),
                "category": category, "value": value, "value_system": value_system, "unit": unit,
                "observed_at": measured_at}

    patient_ref = _reference_id(resolve(r["subject"]["reference"]), "Patient")
    code = code_of(r["code"])
    value, unit, has_value, unmapped_value, value_system = value_of(r)
    shared = {
        "encounter_ref": _reference_id(resolve(r["encounter"]["reference"]), "Encounter"),
        "patient_ref": patient_ref,
    }
    measured_at = F.coalesce(r["effectiveDateTime"], r["effectivePeriod"]["start"],
                             r["effectiveInstant"], r["issued"])
    # The observation-category code (laboratory, vital-signs…), else the first category's first code.
    codings = F.flatten(F.transform(F.coalesce(r["category"], F.array()), lambda c: F.coalesce(c["coding"], F.array())))
    category = F.coalesce(_first_where(codings, lambda c: (c["system"] == OBSERVATION_CATEGORY_URI)
                                       & c["code"].isNotNull())["code"],
                          _first_where(codings, lambda c: c["code"].isNotNull())["code"])
    columns = {**shared, **fact_columns(code, value, unit, value_system)}

    # Components, with their 0-based position in Observation.component (the ref suffix).
    components = F.transform(F.coalesce(r["component"], F.array()), lambda c, i: F.struct(c.alias("c"), i.alias("i")))
    coded = F.filter(components, lambda x: code_of(x["c"]["code"]).isNotNull())

    def part(suffix: Column, cols: dict[str, Column]) -> Column:
        return F.struct(suffix.cast("string").alias("_part"), *[c.alias(n) for n, c in cols.items()])

    def component_row(x: Column) -> Column:
        c_value, c_unit, _, _, c_system = value_of(x["c"])
        return part(F.concat(F.lit(COMPONENT_PART), x["i"].cast("string")),
                    {**shared, **fact_columns(code_of(x["c"]["code"]), c_value, c_unit, c_system)})

    own = F.array(part(F.lit(None), columns))
    # Free text is dropped at the smallest unit: a coded component whose value is free text
    # (valueString, unless an observation's declared answer) is left out and counted, its coded
    # siblings land; so is the Observation's own valueString when coded components remain. Only an
    # Observation left with no coded fact is quarantined (see the checks below).
    free_text_components = F.filter(coded, lambda x: free_text(x["c"]))
    coded = F.filter(coded, lambda x: ~free_text(x["c"]))
    own_free_text = free_text(r)
    # The Observation's own row: its value, or the Observation itself when it has no component
    # (an Observation with no value at all lands with a null value).
    has_own = (has_value & ~own_free_text) | (F.size(components) == 0)
    retracted = r["status"] == STATUS_ENTERED_IN_ERROR
    rows = (
        # A retraction deletes the Observation's row and every component's, coded or not.
        F.when(retracted, F.concat(own, F.transform(components, component_row)))
        .otherwise(F.concat(F.filter(own, lambda _: has_own), F.transform(coded, component_row)))
    )
    free_text_dropped = F.when(retracted, F.lit(0)).otherwise(
        F.size(free_text_components) + F.when(own_free_text & (F.size(coded) > 0), F.lit(1)).otherwise(F.lit(0)))

    def component_reason(x: Column, what_: Column, why: str) -> Column:
        return F.concat(F.lit("Observation.component["), x["i"].cast("string"), F.lit("]."), what_, F.lit(why))

    unmapped_component = _first(F.filter(coded, lambda x: value_of(x["c"])[3].isNotNull()))
    no_code = (F.lit(f"Observation.code has no LOINC coding (system {LOINC_URI})") if is_lab
               else F.lit("Observation.code has no coding (text only)"))
    no_component = (F.lit(f"Observation carries its results in component only, and no component has a LOINC "
                          f"coding (system {LOINC_URI})") if is_lab
                    else F.lit("Observation carries its results in component only, and no component has a coding"))
    return _Mapping(
        columns=columns,
        checks=[
            *_patient_checks(r["subject"]["reference"], patient_ref, "subject"),
            (has_own & code.isNull(), no_code),
            (own_free_text & (F.size(coded) == 0),
             F.lit("Observation.valueString is free text and is not landed, and no coded component remains")),
            (~has_own & (F.size(coded) == 0) & (F.size(free_text_components) > 0),
             F.lit(f"every {what}-coded Observation.component is free text (valueString), which is not landed")),
            (~has_own & (F.size(coded) == 0), no_component),
            (~own_free_text & unmapped_value.isNotNull(),
             F.concat(F.lit("Observation."), unmapped_value, F.lit(f" has no {target} mapping"))),
            (unmapped_component.isNotNull(),
             component_reason(unmapped_component, value_of(unmapped_component["c"])[3],
                              f" has no {target} mapping")),
        ],
        retracted=retracted,
        rows=rows,
        free_text_dropped=free_text_dropped,
    )


def _map_observation_fact(r: Column, profile: FhirProfile, resolve) -> _Mapping:
    return _map_observation(r, profile, resolve, target=OBSERVATION)


def _map_medication(r: Column, profile: FhirProfile, resolve) -> _Mapping:
    patient_ref = _reference_id(resolve(r["subject"]["reference"]), "Patient")
    reference = r["medicationReference"]["reference"]
    contained = _first_where(r["contained"], lambda c: (c["resourceType"] == "Medication")
                             & (F.concat(F.lit("#"), c["id"]) == reference))
    concept = F.coalesce(r["medicationCodeableConcept"],
                         F.from_json(contained["code"], CODEABLE_CONCEPT))
    coding = _preferred_coding(concept)
    dosage = _first(r["dosageInstruction"])
    bounds = dosage["timing"]["repeat"]["boundsPeriod"]
    validity = r["dispenseRequest"]["validityPeriod"]
    dose = _first(dosage["doseAndRate"])["doseQuantity"]
    no_medication = r["medicationCodeableConcept"].isNull() & reference.isNull()
    return _Mapping(
        columns={
            "encounter_ref": _reference_id(resolve(r["encounter"]["reference"]), "Encounter"),
            "patient_ref": patient_ref,
            "drug_code": coding["code"],
            "drug_system": _short_system(coding["system"]),
            "start_date": F.coalesce(bounds["start"], r["authoredOn"]),
            # The dosage's end, else the end of the order's validity: no exposure runs past what was authorised.
            "end_date": F.coalesce(bounds["end"], validity["end"]),
            # An order records no dispense: the first day it may be dispensed stands for it (MedicationDispense,
            # which would carry whenHandedOver, is not collected).
            "dispense_date": validity["start"],
            "dose": dose["value"],
            "dose_unit": F.when(dose.isNotNull(), _unit(dose)),
            "route": _first(dosage["route"]["coding"])["code"],
        },
        checks=[
            *_patient_checks(r["subject"]["reference"], patient_ref, "subject"),
            (no_medication, F.lit("MedicationRequest names no medication")),
            (r["medicationCodeableConcept"].isNull() & ~reference.startswith("#"),
             F.lit("medicationReference points to a Medication outside this resource; send it contained "
                   "or as medicationCodeableConcept")),
            (r["medicationCodeableConcept"].isNull() & contained.isNull(),
             F.lit("medicationReference names a contained Medication that is not there")),
            (coding["code"].isNull() & r["medicationCodeableConcept"].isNull(),
             F.lit("the contained Medication has no code (a compound known by its ingredients only)")),
            (coding["code"].isNull(), F.lit("medicationCodeableConcept has no coding (text only)")),
        ],
        retracted=r["status"] == STATUS_ENTERED_IN_ERROR,
    )


def _map_consent(r: Column, profile: FhirProfile, resolve) -> _Mapping:
    patient_ref = _reference_id(resolve(r["patient"]["reference"]), "Patient")
    status = r["status"]
    provision = r["provision"]
    decision = (
        F.when(status == "active", F.when(provision["type"] == "deny", F.lit("deny")).otherwise(F.lit("permit")))
        .when(status == "inactive", F.lit("withdraw"))
        .when(status == "rejected", F.lit("deny"))
    )
    coded = F.transform(F.coalesce(provision["purpose"], F.array()),
                        lambda c: F.concat(c["system"], F.lit("|"), c["code"]))
    uris = F.transform(F.coalesce(r["policy"], F.array()), lambda p: p["uri"])
    purposes = F.array_distinct(F.filter(
        F.transform(F.concat(coded, uris), lambda key: _lookup(profile.purpose_codes, key)),
        lambda p: p.isNotNull()))
    listed = F.array_join(F.filter(coded, lambda k: k.isNotNull()), ", ")
    return _Mapping(
        columns={
            "patient_ref": patient_ref,
            "purpose": _first(purposes),
            "decision": decision,
            "decision_date": r["dateTime"],
            "valid_from": provision["period"]["start"],
            "valid_until": provision["period"]["end"],
        },
        checks=[
            *_patient_checks(r["patient"]["reference"], patient_ref, "patient"),
            (decision.isNull(), F.concat(F.lit("Consent.status "),
                                         F.coalesce(_safe_token(status, _CODE_TOKEN, "(not a code)"),
                                                    F.lit("(missing)")),
                                         F.lit(" is not a decision"))),
            (F.size(purposes) == 0,
             F.concat(F.lit("no purpose mapped by the profile's purpose_codes (provision.purpose: "),
                      F.when(listed != "", listed).otherwise(F.lit("none")),
                      F.lit("; policy uris: "), F.size(uris).cast("string"), F.lit(")"))),
            (F.size(purposes) > 1,
             F.lit("the Consent maps to several purposes; send one Consent per purpose")),
        ],
        retracted=status == STATUS_ENTERED_IN_ERROR,
    )


_MAPPERS = {
    "patient": _map_patient,
    "encounter": _map_encounter,
    "diagnosis": _map_condition,
    "lab_result": _map_observation,
    "medication": _map_medication,
    "consent": _map_consent,
    "observation": _map_observation_fact,
}


# ----------------------------------------------------------- read units ----

# Every reader builds "units" (one per line, entry or file) with these columns,
# then :func:`_classify` turns them into bronze and quarantine rows.
_UNIT_COLUMNS = ("_source_file", "_line", "_where", "_text", "_size", "_method", "_url", "_full_url",
                 "_pre_rule", "_pre_reason")


def _ndjson_units(spark: SparkSession, path: str, source_file: str) -> DataFrame:
    text, valid = decode_strict("raw", "utf-8-sig")
    lines = read_lines(spark, path).select("line_no", F.length("raw").alias("_size"),
                                           text.alias("_text"), valid.alias("_valid"))
    # Blank lines are not records (the manifest does not count them either).
    lines = lines.where(~F.col("_valid") | ~F.col("_text").rlike(_BLANK))
    return lines.select(
        F.lit(source_file).alias("_source_file"),
        F.col("line_no").alias("_line"),
        F.concat(F.lit(f"{source_file} line "), F.col("line_no").cast("string")).alias("_where"),
        F.col("_text"),
        F.col("_size"),
        *[F.lit(None).cast("string").alias(c) for c in ("_method", "_url", "_full_url")],
        F.when(~F.col("_valid"), F.lit(RULE_ENCODING)).alias("_pre_rule"),
        F.when(~F.col("_valid"), F.lit("bytes are not valid UTF-8 (or are control characters)"))
        .alias("_pre_reason"),
    )


def _whole_files(spark: SparkSession, paths: Sequence[str]) -> DataFrame:
    """One row per file: ``(_path, _text, _valid, _size)``; the bytes decoded strictly as UTF-8."""
    text, valid = decode_strict("content", "utf-8-sig")
    return spark.read.format("binaryFile").load(list(paths)).select(
        F.col("path").alias("_path"), text.alias("_text"), valid.alias("_valid"),
        F.col("length").alias("_size"))


def _source_files(spark: SparkSession, sources: Mapping[str, str]) -> Callable[[Column], Column]:
    """``binaryFile``'s path column → the ``_source_file`` of each path in ``sources``.

    The column holds the path as Hadoop qualifies it (``file:/…``), so the keys are qualified
    the same way. A file without a source fails the read: its rows would have no lineage.
    """
    from jobs.core.files import qualified

    table = {qualified(path): source for path, source in sources.items()}

    def source_file(path: Column) -> Column:
        # No path in the message: a delivered name may hold identifiers (and plans print literals).
        return F.coalesce(_lookup(table, path),
                          F.raise_error(F.lit("a FHIR file was read whose source is unknown; read it again")))
    return source_file


def _not_json_object(text: Column) -> Column:
    return F.json_object_keys(text).isNull()


def _resource_units(spark: SparkSession, paths: Sequence[str], source_file: Callable[[Column], Column]) -> DataFrame:
    files = _whole_files(spark, paths)
    name = source_file(F.col("_path"))
    return files.select(
        name.alias("_source_file"),
        F.lit(1).cast("long").alias("_line"),
        name.alias("_where"),
        F.col("_text"),
        F.col("_size"),
        *[F.lit(None).cast("string").alias(c) for c in ("_method", "_url", "_full_url")],
        F.when(~F.col("_valid"), F.lit(RULE_ENCODING)).alias("_pre_rule"),
        F.when(~F.col("_valid"), F.lit("bytes are not valid UTF-8 (or are control characters)"))
        .alias("_pre_reason"),
    )


def _bundle_units(spark: SparkSession, sources: Mapping[str, str]) -> DataFrame:
    """The entries of every Bundle file of ``sources`` (path → ``_source_file``), from one read."""
    source_file = _source_files(spark, sources)
    files = _whole_files(spark, list(sources)).select(
        "*", source_file(F.col("_path")).alias("_source_file"),
        F.from_json("_text", BUNDLE, JSON_OPTIONS).alias("_b"))
    bundle = F.col("_b")
    rtype = bundle["resourceType"]
    file_rule = (
        F.when(~F.col("_valid"), F.lit(RULE_ENCODING))
        .when(_not_json_object(F.col("_text")), F.lit(RULE_MALFORMED))
        .when(rtype.isNull() | (rtype != BUNDLE_TYPE), F.lit(RULE_UNMAPPED))
        .when(bundle[CORRUPT_FIELD].isNotNull(), F.lit(RULE_MALFORMED))
    )
    file_reason = (
        F.when(~F.col("_valid"), F.lit("bytes are not valid UTF-8 (or are control characters)"))
        .when(_not_json_object(F.col("_text")), F.lit("not a JSON object: truncated or malformed JSON"))
        .when(rtype.isNull() | (rtype != BUNDLE_TYPE),
              F.concat(F.lit("the file holds "),
                       F.coalesce(_safe_token(rtype, _TYPE_NAME, "an invalid resourceType"),
                                  F.lit("no resourceType")),
                       F.lit(", not a Bundle")))
        .otherwise(F.lit("the Bundle does not fit the FHIR R4 structure (an element has the wrong type)"))
    )
    checked = files.select("*", file_rule.alias("_file_rule"), file_reason.alias("_file_reason"))
    # A Bundle that cannot be read is one row: its entries cannot be counted.
    unreadable = checked.where(F.col("_file_rule").isNotNull()).select(
        F.col("_source_file"),
        F.lit(None).cast("long").alias("_line"),
        F.col("_source_file").alias("_where"),
        F.lit(None).cast("string").alias("_text"),
        F.col("_size"),
        *[F.lit(None).cast("string").alias(c) for c in ("_method", "_url", "_full_url")],
        F.col("_file_rule").alias("_pre_rule"),
        F.col("_file_reason").alias("_pre_reason"),
    )
    btype = bundle["type"]
    accepted = btype.isin(list(BUNDLE_TYPES))
    entries = checked.where(F.col("_file_rule").isNull()).select(
        "_source_file", "_b", F.posexplode(F.coalesce(bundle["entry"], F.array())).alias("_pos", "_entry"))
    entry = F.col("_entry")
    line = (F.col("_pos") + 1).cast("long")
    readable = entries.select(
        F.col("_source_file"),
        line.alias("_line"),
        F.concat(F.col("_source_file"), F.lit(" entry "), line.cast("string")).alias("_where"),
        entry["resource"].alias("_text"),
        F.length(entry["resource"]).cast("long").alias("_size"),
        F.upper(entry["request"]["method"]).alias("_method"),
        entry["request"]["url"].alias("_url"),
        entry["fullUrl"].alias("_full_url"),
        F.when(~accepted, F.lit(RULE_UNMAPPED)).alias("_pre_rule"),
        F.when(~accepted, F.concat(
            F.lit("Bundle.type "), F.coalesce(_safe_token(btype, _CODE_TOKEN, "(not a code)"), F.lit("(missing)")),
            F.lit(f" is not accepted ({', '.join(BUNDLE_TYPES)})"))).alias("_pre_reason"),
    )
    return readable.unionByName(unreadable)


# ------------------------------------------------------------- classify ----


def _classify(units: DataFrame, datasets: Sequence[str], expected: str | None, profile: FhirProfile,
              resolve_urls: bool) -> DataFrame:
    """Parse each unit's resource, route it, and give it a rule and reason when it cannot land.

    ``expected`` is the only resource type allowed (NDJSON files); ``None`` routes by type.
    """
    env = F.from_json("_text", RESOURCE_ENVELOPE, JSON_OPTIONS)
    parsed = units.select(*_UNIT_COLUMNS, env.alias("_env"))

    is_delete = F.coalesce(F.col("_method") == METHOD_DELETE, F.lit(False))
    url_type = F.regexp_extract(F.coalesce(F.col("_url"), F.lit("")), rf"^(?:.*/)?([A-Z][A-Za-z]+)/({_ID})$", 1)
    url_id = F.regexp_extract(F.coalesce(F.col("_url"), F.lit("")), rf"^(?:.*/)?([A-Z][A-Za-z]+)/({_ID})$", 2)
    rtype = F.when(is_delete, F.nullif(url_type, F.lit(""))).otherwise(F.col("_env")["resourceType"])
    rid = F.when(is_delete, F.nullif(url_id, F.lit(""))).otherwise(F.coalesce(
        F.col("_env")["id"],
        # A PUT names the record in its url even when the resource omits its id.
        F.when((F.col("_method") == "PUT") & (url_type == F.col("_env")["resourceType"]),
               F.nullif(url_id, F.lit("")))))
    parsed = parsed.select("*", rtype.alias("_type"), rid.alias("_id"))
    parsed = parsed.withColumn("_dataset", _lookup(RESOURCE_DATASETS, F.col("_type")))

    if resolve_urls:
        # fullUrl → Type/id of the Bundle's own entries, so urn:uuid references resolve: one map per
        # Bundle file (a fullUrl names an entry of its own Bundle only), joined to its entries.
        targets = (
            parsed.where(F.col("_full_url").isNotNull() & F.col("_type").isNotNull() & F.col("_id").isNotNull())
            .groupBy("_source_file", "_full_url")
            .agg(F.count(F.lit(1)).alias("_n"), F.first(F.concat("_type", F.lit("/"), "_id")).alias("_target"))
            .where(F.col("_n") == 1)
            .groupBy("_source_file")
            .agg(F.map_from_entries(F.collect_list(F.struct("_full_url", "_target"))).alias("_refs"))
        )
        parsed = parsed.join(F.broadcast(targets), "_source_file", "left")

        def resolve(reference: Column) -> Column:
            return F.coalesce(F.try_element_at(F.col("_refs"), reference), reference)
    else:
        def resolve(reference: Column) -> Column:
            return reference

    upsert_rows = ~is_delete & F.col("_text").isNotNull()
    for dataset in datasets:
        if dataset == OBSERVATION:
            continue  # an Observation is parsed once, as _r_lab_result, whichever dataset it lands in
        rtype_name = DATASET_RESOURCES[dataset]
        parsed = parsed.withColumn(
            f"_r_{dataset}",
            F.when(upsert_rows & (F.col("_type") == rtype_name),
                   F.from_json("_text", RESOURCE_SCHEMAS[rtype_name], JSON_OPTIONS)))
    if OBSERVATION in datasets:
        # Routed per resource, so an entry's rows (its components) are all in one dataset. A DELETE
        # carries no resource to route: it deletes the lab_result record of its url.
        observation = F.col(f"_r_{LAB_RESULT}")
        parsed = parsed.withColumn("_dataset", F.when(
            (F.col("_dataset") == LAB_RESULT) & observation.isNotNull()
            & routes_to_observation(observation, profile.observations), F.lit(OBSERVATION))
            .otherwise(F.col("_dataset")))

    def resource(dataset: str) -> Column:
        return F.col(f"_r_{LAB_RESULT if dataset == OBSERVATION else dataset}")

    mappings = {d: _MAPPERS[d](resource(d), profile, resolve) for d in datasets}

    safe_type = F.coalesce(_safe_token(F.col("_type"), _TYPE_NAME, "an invalid resourceType"),
                           F.lit("(none)"))
    rule_reason: list[tuple[Column, str, Column]] = [
        (F.col("_pre_rule").isNotNull(), "", F.col("_pre_reason")),
        (is_delete & F.col("_id").isNull(), RULE_UNMAPPED,
         F.lit("DELETE request.url is not Type/id (conditional deletes are not applied)")),
        (is_delete & F.col("_dataset").isNull() & ~F.col("_type").isin(list(NOT_COLLECTED_TYPES)), RULE_UNMAPPED,
         F.concat(F.lit("DELETE of "), safe_type, F.lit(", which maps to no dataset"))),
        (F.col("_method").isin("GET", "HEAD", "PATCH"), RULE_UNMAPPED,
         F.concat(F.lit("request.method "), F.col("_method"), F.lit(" carries no record to land"))),
        (~is_delete & F.col("_text").isNull(), RULE_UNMAPPED, F.lit("the entry has no resource")),
        # The envelope is two strings: it is corrupt only when the text is not a JSON object.
        (~is_delete & F.col("_env")[CORRUPT_FIELD].isNotNull(), RULE_MALFORMED,
         F.lit("not a JSON object: truncated or malformed JSON")),
        (F.col("_type").isNull(), RULE_UNMAPPED, F.lit("no resourceType: not a FHIR resource")),
        # A resource the consortium does not collect: counted, never read further.
        (F.col("_type").isin(list(NOT_COLLECTED_TYPES)), _NOT_COLLECTED, F.lit(None).cast("string")),
    ]
    if expected is not None:
        rule_reason.append((F.col("_type") != expected, RULE_UNMAPPED,
                            F.concat(F.lit("a "), safe_type,
                                     F.lit(f" in a {RESOURCE_DATASETS[expected]} file (one resource type per "
                                           f"file: {expected})"))))
    rule_reason.append((F.col("_type") == BUNDLE_TYPE, RULE_UNMAPPED,
                        F.lit("a Bundle inside a Bundle entry or NDJSON line is not read; deliver its entries")))
    rule_reason.append((F.col("_dataset").isNull() | ~F.col("_dataset").isin(list(datasets)), RULE_UNMAPPED,
                        F.concat(F.lit("resource type "), safe_type, F.lit(" is not a FHIR R4 resource type"))))
    action = F.lit(ACTION_UPSERT)
    for dataset, mapping in mappings.items():
        r = resource(dataset)
        of_type = F.col("_dataset") == dataset
        rule_reason.append((of_type & ~is_delete & r[CORRUPT_FIELD].isNotNull(), RULE_MALFORMED,
                            F.lit(f"the {DATASET_RESOURCES[dataset]} does not fit the FHIR R4 structure "
                                  "(an element has the wrong type)")))
        rule_reason.append((of_type & F.col("_id").isNull(), RULE_UNMAPPED,
                            F.lit(f"the {DATASET_RESOURCES[dataset]} has no id")))
        applies = of_type & ~is_delete & ~F.coalesce(mapping.retracted, F.lit(False))
        for failed, unmapped in mapping.checks:
            rule_reason.append((applies & F.coalesce(failed, F.lit(False)), RULE_UNMAPPED, unmapped))
        action = F.when(of_type & F.coalesce(mapping.retracted, F.lit(False)), F.lit(ACTION_DELETE)).otherwise(action)
    action = F.when(is_delete, F.lit(ACTION_DELETE)).otherwise(action)

    rule: Column | None = None
    reason: Column | None = None
    for condition, rule_name, why in rule_reason:
        value = F.col("_pre_rule") if rule_name == "" else F.lit(rule_name)
        rule = F.when(condition, value) if rule is None else rule.when(condition, value)
        reason = F.when(condition, why) if reason is None else reason.when(condition, why)
    assert rule is not None and reason is not None  # rule_reason always holds the parse rules
    not_collected = F.coalesce(rule == _NOT_COLLECTED, F.lit(False))
    checked = parsed.select("*", F.when(~not_collected, rule).alias("_rule"), reason.alias("_reason"),
                            action.alias("_action"), not_collected.alias("_not_collected"))

    def rows(mapping: _Mapping) -> Column:
        if mapping.rows is None:
            return F.array(F.struct(F.lit(None).cast("string").alias("_part"),
                                    *[c.alias(n) for n, c in mapping.columns.items()]))
        # A DELETE entry carries no resource: its one row names the record of request.url.
        return F.when(is_delete, F.array(F.struct(F.lit(None).cast("string").alias("_part"),
                                                  *[F.lit(None).cast("string").alias(n) for n in mapping.columns])))\
            .otherwise(mapping.rows)

    # Keep only what the outputs need: the mapped rows of the entry's dataset, the
    # structure of a rejected record. The resource text and the Bundle's reference
    # map stay out of the cache.
    return checked.select(
        "_source_file", "_line", "_where", "_id", "_dataset", "_rule", "_reason", "_action", "_not_collected",
        F.when(F.col("_not_collected"), F.col("_type")).alias("_not_collected_type"),
        F.when(F.col("_rule").isNotNull(), _record_safe(KNOWN_ELEMENTS)).alias("_record_safe"),
        *[F.when(F.col("_dataset") == d, rows(mappings[d])).alias(f"_rows_{d}") for d in datasets],
        F.coalesce(*[F.when((F.col("_dataset") == d) & ~is_delete, mappings[d].free_text_dropped)
                     for d in datasets if mappings[d].free_text_dropped is not None], F.lit(0))
        .alias("_free_text_dropped"),
    )


def _record_safe(known: Sequence[str]) -> Column:
    """The structure of a rejected record: its type, request method, which R4 elements it carried, size."""
    keys = F.coalesce(F.json_object_keys(F.col("_text")), F.array())
    elements = F.array_sort(F.array_distinct(F.filter(keys, lambda k: k.isin(list(known)))))
    return F.to_json(F.struct(
        _safe_token(F.col("_type"), _TYPE_NAME, "(invalid)").alias("resourceType"),
        F.when(F.col("_method").isin("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"), F.col("_method"))
        .alias("method"),
        F.when(F.col("_text").isNotNull(), elements).alias("elements"),
        F.when(F.col("_text").isNotNull(), F.size(F.filter(keys, lambda k: ~k.isin(list(known)))))
        .alias("other_keys"),
        F.col("_size").alias("length"),
    ))


def _lineage_columns(lineage: FileLineage) -> list[Column]:
    return [
        F.lit(lineage.establishment_id).alias("_establishment"),
        F.lit(lineage.batch_id).alias("_batch_id"),
        F.col("_source_file").alias("_source_file"),
        F.col("_line").cast("long").alias("_source_line"),
        F.col("_id").cast("string").alias("_resource_id"),
        F.lit(lineage.extracted_at).cast("timestamp").alias("_extracted_at"),
        F.lit(lineage.ingested_at).cast("timestamp").alias("_ingested_at"),
    ]


def _split(classified: DataFrame, datasets: Sequence[str], file_dataset: str,
           lineage: FileLineage) -> FhirReadResult:
    # One parse feeds bronze, quarantine and the counts. Without a barrier, Spark
    # pushes the quarantine/bronze filters below the parse and repeats from_json
    # inside every condition. A local checkpoint rather than a cache: each query
    # after it (a write per dataset, quarantine, counts) then plans a one-node
    # relation instead of analysing the parse and classification again.
    classified = classified.localCheckpoint(eager=False, storageLevel=StorageLevel.MEMORY_AND_DISK)
    kept = classified.where(F.col("_rule").isNull() & ~F.col("_not_collected"))
    bronze: dict[str, DataFrame] = {}
    for dataset in datasets:
        mapped = F.col("_row")
        upsert = F.col("_action") == ACTION_UPSERT

        def column(name: str) -> Column:
            if name == RECORD_REF[dataset]:
                return F.concat(F.col("_id"), F.coalesce(mapped["_part"], F.lit("")))
            if name == "record_action":
                return F.col("_action")
            return F.when(upsert, mapped[name])

        frame = kept.where(F.col("_dataset") == dataset).select(
            "*", F.explode(F.col(f"_rows_{dataset}")).alias("_row")).select(
            *[column(c).cast("string").alias(c) for c in BRONZE_COLUMNS[dataset]],
            *_lineage_columns(lineage),
        )
        bronze[dataset] = frame.select(*bronze_schema(dataset).fieldNames())

    quarantine = classified.where(F.col("_rule").isNotNull()).select(
        F.lit(lineage.establishment_id).alias("establishment_id"),
        F.lit(lineage.batch_id).alias("batch_id"),
        F.coalesce(F.when(F.col("_dataset").isin(list(datasets)), F.col("_dataset")), F.lit(file_dataset))
        .alias("dataset"),
        F.lit(STAGE_INGEST).alias("stage"),
        F.col("_rule").alias("rule"),
        F.concat(F.col("_where"), F.lit(": "), F.col("_reason")).alias("reason"),
        F.col("_source_file").alias("source_file"),
        F.col("_line").cast("long").alias("source_line"),
        F.sha2(F.col("_id"), 256).alias("resource_id_hash"),
        F.lit(None).cast("string").alias("person_id"),
        F.col("_record_safe").alias("record_safe"),
        F.lit(lineage.ingested_at).cast("timestamp").alias("quarantined_at"),
    ).select(*QUARANTINE_SCHEMA.fieldNames())

    to_bronze = F.col("_rule").isNull() & ~F.col("_not_collected")
    bronze_rows = reduce(lambda a, b: a + b, [
        F.when(to_bronze & (F.col("_dataset") == d), F.size(f"_rows_{d}")).otherwise(F.lit(0)) for d in datasets])
    reads = classified.groupBy(F.col("_source_file").alias("source_file"),
                               F.col("_not_collected_type").alias("not_collected_type")).agg(
        F.count(F.lit(1)).alias("entries"),
        F.count(F.when(to_bronze, F.lit(1))).alias("to_bronze"),
        F.count(F.when(F.col("_rule").isNotNull(), F.lit(1))).alias("quarantined"),
        F.count(F.when(F.col("_not_collected"), F.lit(1))).alias("not_collected"),
        F.sum(bronze_rows).cast("long").alias("bronze_rows"),
        F.sum(F.when(to_bronze, F.col("_free_text_dropped")).otherwise(F.lit(0))).cast("long")
        .alias("free_text_dropped"))
    return FhirReadResult(bronze=bronze, quarantine=quarantine, reads=reads, _cached=classified)


# ----------------------------------------------------------- entry points ----


def read_fhir_file(spark: SparkSession, path: str, dataset: str, profile: FhirProfile,
                   lineage: FileLineage) -> FhirReadResult:
    """Read one landed FHIR file; every line or entry ends in bronze, in quarantine or is counted not collected.

    ``dataset`` is a canonical dataset (Bulk Data NDJSON of that dataset's
    resource type), ``"bundle"`` (one Bundle, entries routed by type) or
    ``"resource"`` (one JSON resource, routed by type).

    Example::

        result = read_fhir_file(spark, "/lake/landing/cisss_estuaire/b1/Patient.ndjson", "patient",
                                profile, lineage)
        result.bronze["patient"].show(); result.quarantine.show(); result.file_reads()
    """
    if dataset in DATASETS:
        units = _ndjson_units(spark, path, lineage.source_file)
        # An Observation file feeds lab_result and observation, whichever of the two the manifest names.
        targets = list(OBSERVATION_DATASETS) if dataset in OBSERVATION_DATASETS else [dataset]
        classified = _classify(units, targets, DATASET_RESOURCES[dataset], profile, resolve_urls=False)
        return _split(classified, targets, dataset, lineage)
    if dataset == DATASET_BUNDLE:
        return read_fhir_bundles(spark, {path: lineage.source_file}, profile, lineage)
    if dataset == DATASET_RESOURCE:
        return read_fhir_resources(spark, [path], profile, lineage,
                                   source_file=lambda _: F.lit(lineage.source_file))
    raise FhirInputError(f"unknown FHIR dataset {dataset!r}; use one of {', '.join(DATASETS)}, "
                         f"{DATASET_BUNDLE} or {DATASET_RESOURCE}")


def read_fhir_bundles(spark: SparkSession, sources: Mapping[str, str], profile: FhirProfile,
                      lineage: FileLineage) -> FhirReadResult:
    """Read many Bundle files in one Spark pass; ``sources`` maps each path to its ``_source_file``.

    The files are read together (one ``binaryFile`` scan), their entries
    exploded once and classified by one plan, so the plan is the same for one
    Bundle or a thousand; ``_source_line`` is the entry's index in its own
    Bundle and ``urn:uuid`` references resolve within their own Bundle.
    ``lineage.source_file`` is not used (each file has its own);
    :meth:`FhirReadResult.file_reads` has one entry per file.
    """
    if not sources:
        raise FhirInputError("no FHIR Bundle file to read; pass at least one path")
    units = _bundle_units(spark, sources)
    classified = _classify(units, DATASETS, None, profile, resolve_urls=True)
    return _split(classified, DATASETS, DATASET_BUNDLE, lineage)


def read_fhir_resources(spark: SparkSession, paths: Iterable[str], profile: FhirProfile, lineage: FileLineage,
                        source_file: Callable[[Column], Column] | None = None) -> FhirReadResult:
    """Read many single-resource JSON files (one pretty-printed resource each) in one Spark job.

    Each file is one row read (``_source_line`` 1), routed by its resource
    type. ``_source_file`` is ``<lineage.source_file>/<file name>`` unless
    ``source_file`` maps the ``binaryFile`` path column otherwise.
    """
    paths = list(paths)
    if not paths:
        raise FhirInputError("no FHIR resource file to read; pass at least one path")
    if source_file is None:
        prefix = lineage.source_file.rstrip("/")

        def source_file(path: Column) -> Column:
            return F.concat(F.lit(f"{prefix}/"), F.substring_index(path, "/", -1))

    units = _resource_units(spark, paths, source_file)
    classified = _classify(units, DATASETS, None, profile, resolve_urls=False)
    return _split(classified, DATASETS, DATASET_RESOURCE, lineage)


__all__ = [
    "COMPONENT_PART", "DATASET_BUNDLE", "DATASET_RESOURCE", "FhirInputError", "FhirReadResult", "FileLineage",
    "FileReads", "NOT_COLLECTED_TYPES", "RULE_ENCODING", "RULE_MALFORMED", "RULE_UNMAPPED",
    "read_fhir_bundles", "read_fhir_file", "read_fhir_resources",
]
