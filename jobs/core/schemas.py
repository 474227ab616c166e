"""Explicit schemas of every dataset, zone by zone.

Bronze keeps what the establishment sent, mapped to canonical column names but
still as text and still identifying. Staged and silver hold typed,
pseudonymised rows whose column names follow OMOP CDM habits.
"""

from __future__ import annotations

from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DateType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

DATASETS = ("patient", "encounter", "diagnosis", "lab_result", "medication", "consent", "observation")

# A coded answer (``value_as_concept``) is ``<vocabulary>|<code>``, as FHIR writes a token:
# ``SNOMED|266919005`` (the vocabulary id when the system is known, else its URI as sent).
CONCEPT_SEPARATOR = "|"

# Values of the canonical ``record_action`` column.
ACTION_UPSERT = "upsert"
ACTION_DELETE = "delete"

# ---------------------------------------------------------------- bronze ----

# The bronze patient column holding the linkage identifiers a record carries besides the NAM.
PERSON_IDENTIFIERS = "person_identifiers"

# Canonical source columns per dataset (all text, as delivered). ``*_ref`` columns
# are the establishment's own identifiers: the MRN in CSV extracts, the resource
# id in FHIR. ``record_action`` says whether the row is an upsert or a deletion.
BRONZE_COLUMNS: dict[str, tuple[str, ...]] = {
    "patient": (
        "patient_ref", "mrn", "nam", "family_name", "given_name", "birth_date", "sex",
        "street_address", "city", "postal_code", "phone", "email", "deceased_date",
        "record_action",
        # Linkage identifiers other than the NAM, as a JSON object {system: value}
        # (systems of ``person_identifiers`` in config/pipeline.yaml).
        PERSON_IDENTIFIERS,
    ),
    "encounter": (
        "encounter_ref", "patient_ref", "visit_start", "visit_end", "visit_type",
        "care_site", "admission_note", "record_action",
        # The coded reason for the visit (FHIR Encounter.reasonCode, Synthea REASONCODE): a code and its system.
        "reason_code", "reason_system",
    ),
    "diagnosis": (
        "diagnosis_ref", "encounter_ref", "patient_ref", "condition_code", "condition_system",
        "condition_date", "diagnosis_type", "record_action",
        # When the condition resolved (FHIR Condition.abatement[x], Synthea STOP).
        "condition_end_date",
    ),
    # ``value`` is the result as sent; with ``value_system`` it is a coded answer (a code of that
    # system: ``value_as_concept``), never a number.
    "lab_result": (
        "lab_result_ref", "encounter_ref", "patient_ref", "loinc_code", "value", "unit",
        "measured_at", "value_system", "record_action",
        # FHIR observation-category code (laboratory, vital-signs, survey…), Synthea CATEGORY.
        "category",
    ),
    "medication": (
        "medication_ref", "encounter_ref", "patient_ref", "drug_code", "drug_system",
        "start_date", "end_date", "dose", "dose_unit", "route", "record_action",
        # When the drug was (or, from a FHIR order, may first be) dispensed.
        "dispense_date",
    ),
    "consent": (
        "consent_ref", "patient_ref", "purpose", "decision", "decision_date",
        "valid_from", "valid_until", "record_action",
    ),
    # Facts that are not LOINC measurements (OMOP observation): SNOMED-coded observables, survey and
    # social-history answers, scores. ``category`` is FHIR's Observation.category code
    # (social-history, survey, exam…); ``value`` with ``value_system`` is a coded answer.
    "observation": (
        "observation_ref", "encounter_ref", "patient_ref", "observation_code", "observation_system",
        "category", "value", "value_system", "unit", "observed_at", "record_action",
    ),
}

# The column that identifies a record within one establishment's dataset.
RECORD_REF: dict[str, str] = {
    "patient": "patient_ref",
    "encounter": "encounter_ref",
    "diagnosis": "diagnosis_ref",
    "lab_result": "lab_result_ref",
    "medication": "medication_ref",
    "consent": "consent_ref",
    "observation": "observation_ref",
}

# Bronze columns that are direct identifiers or free text: they never leave bronze.
IDENTIFYING_COLUMNS = (
    "patient_ref", "mrn", "nam", "family_name", "given_name", "birth_date",
    "street_address", "city", "postal_code", "phone", "email", "admission_note", PERSON_IDENTIFIERS,
)

LINEAGE_FIELDS = [
    StructField("_establishment", StringType(), False),
    StructField("_batch_id", StringType(), False),
    StructField("_source_file", StringType(), False),
    # Line number in a CSV file (header is line 1), or line in an NDJSON file;
    # for a Bundle entry, its index in the Bundle.
    StructField("_source_line", LongType(), True),
    StructField("_resource_id", StringType(), True),
    StructField("_extracted_at", TimestampType(), False),
    StructField("_ingested_at", TimestampType(), False),
]
LINEAGE_COLUMNS = tuple(f.name for f in LINEAGE_FIELDS)


def bronze_schema(dataset: str) -> StructType:
    """Schema of a bronze table: canonical text columns plus lineage."""
    fields = [StructField(name, StringType(), True) for name in BRONZE_COLUMNS[dataset]]
    return StructType(fields + LINEAGE_FIELDS)


# ------------------------------------------------------------ quarantine ----

# One table for every rejected row, whatever the stage that rejected it. The
# record is kept only in a safe form (pseudonymised columns, identifiers masked).
QUARANTINE_SCHEMA = StructType([
    StructField("establishment_id", StringType(), False),
    StructField("batch_id", StringType(), False),
    StructField("dataset", StringType(), True),
    StructField("stage", StringType(), False),
    StructField("rule", StringType(), False),
    StructField("reason", StringType(), False),
    StructField("source_file", StringType(), True),
    StructField("source_line", LongType(), True),
    StructField("resource_id_hash", StringType(), True),
    StructField("person_id", StringType(), True),
    StructField("record_safe", StringType(), True),
    StructField("quarantined_at", TimestampType(), False),
])

# --------------------------------------------------------- staged/silver ----

_LINEAGE_SILVER = [
    StructField("_batch_id", StringType(), False),
    StructField("_extracted_at", TimestampType(), False),
]

SILVER_SCHEMAS: dict[str, StructType] = {
    "patient": StructType([
        StructField("person_id", StringType(), False),
        StructField("establishment_id", StringType(), False),
        StructField("patient_key", StringType(), False),
        StructField("person_id_source", StringType(), False),
        StructField("gender_source_value", StringType(), True),
        StructField("year_of_birth", IntegerType(), True),
        StructField("month_of_birth", IntegerType(), True),
        StructField("postal_prefix", StringType(), True),
        StructField("is_deceased", BooleanType(), True),
        *_LINEAGE_SILVER,
    ]),
    "encounter": StructType([
        StructField("visit_occurrence_id", StringType(), False),
        StructField("person_id", StringType(), False),
        StructField("establishment_id", StringType(), False),
        StructField("visit_start_date", DateType(), True),
        StructField("visit_start_datetime", TimestampType(), True),
        StructField("visit_end_date", DateType(), True),
        StructField("visit_end_datetime", TimestampType(), True),
        StructField("visit_source_value", StringType(), True),
        StructField("care_site_source_value", StringType(), True),
        StructField("visit_reason_source_value", StringType(), True),
        StructField("visit_reason_source_vocabulary", StringType(), True),
        *_LINEAGE_SILVER,
    ]),
    "diagnosis": StructType([
        StructField("condition_occurrence_id", StringType(), False),
        StructField("person_id", StringType(), False),
        StructField("establishment_id", StringType(), False),
        StructField("visit_occurrence_id", StringType(), True),
        StructField("condition_start_date", DateType(), True),
        StructField("condition_end_date", DateType(), True),
        StructField("condition_source_value", StringType(), True),
        StructField("condition_source_vocabulary", StringType(), True),
        StructField("condition_status_source_value", StringType(), True),
        *_LINEAGE_SILVER,
    ]),
    "lab_result": StructType([
        StructField("measurement_id", StringType(), False),
        StructField("person_id", StringType(), False),
        StructField("establishment_id", StringType(), False),
        StructField("visit_occurrence_id", StringType(), True),
        StructField("measurement_date", DateType(), True),
        StructField("measurement_datetime", TimestampType(), True),
        StructField("measurement_source_value", StringType(), True),
        StructField("measurement_source_vocabulary", StringType(), True),
        StructField("value_as_number", DoubleType(), True),
        StructField("value_source_value", StringType(), True),
        StructField("value_as_concept", StringType(), True),
        StructField("unit_source_value", StringType(), True),
        StructField("category", StringType(), True),
        *_LINEAGE_SILVER,
    ]),
    "medication": StructType([
        StructField("drug_exposure_id", StringType(), False),
        StructField("person_id", StringType(), False),
        StructField("establishment_id", StringType(), False),
        StructField("visit_occurrence_id", StringType(), True),
        StructField("drug_exposure_start_date", DateType(), True),
        StructField("drug_exposure_end_date", DateType(), True),
        StructField("drug_dispense_date", DateType(), True),
        StructField("drug_source_value", StringType(), True),
        StructField("drug_source_vocabulary", StringType(), True),
        StructField("dose_value", DoubleType(), True),
        StructField("dose_unit_source_value", StringType(), True),
        StructField("route_source_value", StringType(), True),
        *_LINEAGE_SILVER,
    ]),
    "consent": StructType([
        StructField("consent_id", StringType(), False),
        StructField("person_id", StringType(), False),
        StructField("establishment_id", StringType(), False),
        StructField("purpose", StringType(), True),
        StructField("decision", StringType(), True),
        StructField("decision_date", DateType(), True),
        StructField("valid_from", DateType(), True),
        StructField("valid_until", DateType(), True),
        *_LINEAGE_SILVER,
    ]),
    "observation": StructType([
        StructField("observation_id", StringType(), False),
        StructField("person_id", StringType(), False),
        StructField("establishment_id", StringType(), False),
        StructField("visit_occurrence_id", StringType(), True),
        StructField("observation_date", DateType(), True),
        StructField("observation_datetime", TimestampType(), True),
        StructField("observation_source_value", StringType(), True),
        StructField("observation_source_vocabulary", StringType(), True),
        StructField("category", StringType(), True),
        StructField("value_as_number", DoubleType(), True),
        StructField("value_as_string", StringType(), True),
        StructField("value_as_concept", StringType(), True),
        StructField("unit_source_value", StringType(), True),
        *_LINEAGE_SILVER,
    ]),
}

# Record key of each silver table within an establishment.
SILVER_KEY: dict[str, str] = {
    "patient": "patient_key",
    "encounter": "visit_occurrence_id",
    "diagnosis": "condition_occurrence_id",
    "lab_result": "measurement_id",
    "medication": "drug_exposure_id",
    "consent": "consent_id",
    "observation": "observation_id",
}

# Staged rows carry, besides the silver columns, what validation and land need.
STAGED_EXTRA_FIELDS = [
    StructField("record_action", StringType(), False),
    StructField("person_id_flag", StringType(), True),
    StructField("_parse_errors", ArrayType(StringType()), False),
    StructField("_source_file", StringType(), False),
    StructField("_source_line", LongType(), True),
    StructField("_resource_id_hash", StringType(), True),
]


def staged_schema(dataset: str) -> StructType:
    """Schema of a staged (pseudonymised, typed, not yet validated) table."""
    silver = SILVER_SCHEMAS[dataset]
    derived_at_land = CONCEPT_COLUMNS.get(dataset, ())
    nullable = [StructField(f.name, f.dataType, True) for f in silver.fields if f.name not in derived_at_land]
    return StructType(nullable + STAGED_EXTRA_FIELDS)


def silver_columns(dataset: str) -> tuple[str, ...]:
    return tuple(f.name for f in SILVER_SCHEMAS[dataset].fields)


# ------------------------------------------------------------- concepts ----

# Standard concepts beside the source values (jobs.terminology.concepts), derived at land from
# silver's own source columns and re-derived there when a map changes: silver has them, staged
# and validated rows do not. ``*_concept_map`` is the map (``<id>|<version>``) or rule that gave
# the concept; 0 is "no matching concept". Lab results keep the number as sent beside
# ``value_as_number``, which holds it in the canonical unit of its LOINC code.
CONCEPT_FIELDS: dict[str, list[StructField]] = {
    "patient": [StructField("gender_concept_id", IntegerType(), True),
                StructField("gender_concept_map", StringType(), True)],
    "encounter": [StructField("visit_concept_id", IntegerType(), True),
                  StructField("visit_concept_map", StringType(), True)],
    "diagnosis": [StructField("condition_concept_code", StringType(), True),
                  StructField("condition_concept_map", StringType(), True)],
    "lab_result": [StructField("value_source_as_number", DoubleType(), True),
                   StructField("unit_concept_code", StringType(), True),
                   StructField("measurement_concept_map", StringType(), True)],
    "medication": [StructField("drug_concept_code", StringType(), True),
                   StructField("drug_concept_map", StringType(), True)],
}
CONCEPT_COLUMNS: dict[str, frozenset[str]] = {
    d: frozenset(f.name for f in CONCEPT_FIELDS.get(d, ())) for d in SILVER_SCHEMAS}
for _dataset, _fields in CONCEPT_FIELDS.items():
    SILVER_SCHEMAS[_dataset] = StructType(SILVER_SCHEMAS[_dataset].fields + _fields)
