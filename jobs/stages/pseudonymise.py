"""Bronze → staged: keyed pseudonyms, generalised quasi-identifiers, typed values.

What leaves this stage carries no direct identifier: names, addresses, phones,
e-mails, MRNs, NAMs and free text are dropped; a coded field (code, unit, care
site, type) whose value is outside its vocabulary is masked and its row marked
for quarantine (:mod:`jobs.privacy.coded_fields`); birth dates keep year and
month; postal codes keep their first three characters (Canadian FSA), and
only where at least k persons share them. Keying uses HMAC-SHA256 built from
Spark functions (:mod:`jobs.privacy.crypto`), never a Python UDF.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from jobs.core.config import Consortium, CsvProfile, Establishment, PersonIdentifierSystem
from jobs.privacy.coded_fields import UNIT_COLUMNS, declared_vocabulary, guard_coded_fields
from jobs.privacy.crypto import ServiceKey, SparkKey, hmac_sha256_hex
from jobs.privacy.keys import PseudonymKey
from jobs.core.lake import TRANSIENT_PARTITIONS, Lake
from jobs.core.batchlog import Stage, Status
from jobs.core.ops import append_batch_log, batches_with_status
from jobs.core.schemas import BRONZE_COLUMNS, CONCEPT_SEPARATOR, DATASETS, PERSON_IDENTIFIERS, staged_schema
from jobs.reference.vocabularies import VOCABULARY_TOKENS, luhn_ok, vocabulary_of
from jobs.core.tables import (cast_to, on_each_table, ready_table, replace_rows, table_exists,
                              written_rows)
from jobs.core.writer_lock import Mode, writes_lake

STAGE = Stage.PSEUDONYMISE
PERSON_FROM_NAM = "nam"
PERSON_FROM_MRN = "establishment_fallback"
FLAG_FALLBACK = "establishment_fallback"
FLAG_UNKNOWN_PATIENT = "unknown_patient"
# The consortium's linkage when pipeline.yaml declares none: the Québec NAM.
DEFAULT_SYSTEM = PersonIdentifierSystem(id=PERSON_FROM_NAM, check="nam")

# Source code systems as establishments write them → vocabulary ids (OMOP habit), from the one
# list of code systems (jobs.reference.vocabularies).
VOCABULARIES = VOCABULARY_TOKENS


@dataclass(frozen=True)
class Keyring:
    """The keys one establishment's batch is pseudonymised with, held as data, never as plan literals."""

    person: SparkKey
    establishment: SparkKey
    fingerprint: str

    @classmethod
    def for_establishment(cls, spark: SparkSession, key: PseudonymKey | ServiceKey, establishment_id: str) -> "Keyring":
        return cls(SparkKey(spark, key.person_key()), SparkKey(spark, key.establishment_key(establishment_id)),
                   key.fingerprint)

    def record_id(self, namespace: str, ref: Column) -> Column:
        """Record ids are keyed per establishment; the namespace keeps datasets apart."""
        return hmac_sha256_hex(self.establishment, F.concat(F.lit(f"{namespace}:"), ref))


# ------------------------------------------------------------- values ----

def _blank_to_null(col: Column) -> Column:
    return F.nullif(F.trim(col), F.lit(""))


def normalise_nam(col: Column) -> Column:
    """Upper case, without spaces or separators (``trem 8552 1512`` → ``TREM85521512``)."""
    return normalise_identifier(DEFAULT_SYSTEM, col)


def is_valid_nam(nam: Column, birth_date: Column, sex: Column) -> Column:
    """A Québec NAM: 4 letters, birth yy mm(+50 if female) dd, 2 digits; consistent with the birth date and sex when known."""
    yy, mm, dd = (F.substring(nam, 5, 2), F.substring(nam, 7, 2).try_cast("int"), F.substring(nam, 9, 2))
    month = F.when(mm > 50, mm - 50).otherwise(mm)
    mmdd = F.concat(F.lpad(month.cast("string"), 2, "0"), dd)
    real_date = (F.try_to_date(F.concat(F.lit("20"), yy, mmdd), "yyyyMMdd").isNotNull()
                 | F.try_to_date(F.concat(F.lit("19"), yy, mmdd), "yyyyMMdd").isNotNull())
    shape = F.coalesce(nam.rlike(r"^[A-Z]{4}[0-9]{8}$"), F.lit(False))
    agrees_with_birth = F.coalesce(F.date_format(birth_date, "yyMMdd") == F.concat(yy, mmdd), F.lit(True))
    agrees_with_sex = (F.when(sex == "female", mm > 50).when(sex == "male", mm <= 12).otherwise(F.lit(True)))
    return shape & F.coalesce(real_date & agrees_with_birth & agrees_with_sex, F.lit(False))


def vocabulary(col: Column) -> Column:
    return vocabulary_of(col)


# A result value is kept as text outside bronze only when it is a number (with
# an optional comparator), a qualitative result word, or a short code token
# of letters then digits (an answer code such as LA6576-8). Anything else may be free
# text: a survey answer (LOINC 56799-0) can be the patient's street address,
# and a phone number or a postal code is no result code.
_NUMERIC_RESULT = r"^([<>]=?|[≤≥])?\s?[-+]?[0-9]+([.,][0-9]+)?$"
_CODED_RESULT = r"^[A-Z]{1,4}[0-9]{1,12}(-[0-9])?$"
QUALITATIVE_RESULTS = (
    "positive", "negative", "pos", "neg", "detected", "not detected", "undetected", "reactive", "non-reactive",
    "nonreactive", "indeterminate", "equivocal", "inconclusive", "normal", "abnormal", "high", "low", "trace",
    "present", "absent", "+", "++", "+++", "++++", "-", "1+", "2+", "3+", "4+",
    "positif", "négatif", "negatif", "détecté", "non détecté", "réactif", "non réactif", "anormal", "traces",
)


def coded_value(col: Column) -> Column:
    """The text of a result when it is typed or coded (see above); null when it may be free text."""
    text = _blank_to_null(col)
    coded = (text.rlike(_NUMERIC_RESULT) | text.rlike(_CODED_RESULT)
             | F.lower(text).isin(*QUALITATIVE_RESULTS))
    return F.when(F.coalesce(coded, F.lit(False)), text)


def coded_answer(value: Column, system: Column) -> Column:
    """``<vocabulary>|<code>`` of a coded answer (a value with its code system); null for any other value."""
    code, vocab = _blank_to_null(value), vocabulary(system)
    return F.when(code.isNotNull() & vocab.isNotNull(), F.concat(vocab, F.lit(CONCEPT_SEPARATOR), code))


class Parser:
    """Typed values from an establishment's text, with the list of what failed to parse."""

    def __init__(self, est: Establishment):
        profile = est.input
        if isinstance(profile, CsvProfile):
            self.datetime_formats = [profile.datetime_format, profile.date_format]
            self.date_formats = [profile.date_format]
            self.decimal = profile.decimal_separator
        else:  # FHIR: ISO-8601 dates, dateTimes and partial dates
            self.datetime_formats, self.date_formats, self.decimal = [], [], "."
        # The closed list of word answers an observation may keep (folded → as the profile writes it).
        self.answers = profile.observations.answer_lookup()

    def answer(self, col: Column) -> Column:
        """A word answer of the profile's closed list, as the list writes it; null for anything else.

        The reader already dropped other text; checked again here because nothing but a declared
        answer may leave bronze as text. A boolean (FHIR valueBoolean) is its own closed list.
        """
        folded = F.lower(_blank_to_null(col))
        listed = (F.try_element_at(F.create_map(*[F.lit(x) for pair in self.answers.items() for x in pair]), folded)
                  if self.answers else F.lit(None).cast("string"))
        return F.coalesce(listed, F.when(folded.isin("true", "false"), folded))

    def timestamp(self, col: Column) -> Column:
        text = _blank_to_null(col)
        if not self.datetime_formats:
            return F.try_to_timestamp(text)
        return F.coalesce(*[F.try_to_timestamp(text, F.lit(f)) for f in self.datetime_formats])

    def date(self, col: Column) -> Column:
        text = _blank_to_null(col)
        if not self.date_formats:
            return F.to_date(F.try_to_timestamp(text))
        return F.coalesce(*[F.try_to_date(text, f) for f in self.date_formats])

    def number(self, col: Column) -> Column:
        text = _blank_to_null(col)
        if self.decimal == ",":
            text = F.regexp_replace(text, ",", ".")
        return text.try_cast("double")


# Not a parse error: a finding on two dates that staged does not keep (see ``pseudonymise_patients``).
DEATH_BEFORE_BIRTH = "date_order:deceased_date"


def _error(tag: str, raw: Column, parsed: Column) -> Column:
    """``tag`` when a non-empty value did not parse, else null."""
    return F.when(_blank_to_null(raw).isNotNull() & parsed.isNull(), F.lit(tag))


def _errors(*flags: Column) -> Column:
    return F.filter(F.array(*flags), lambda x: x.isNotNull())


# -------------------------------------------------------- transforms ----

def drop_exact_duplicates(bronze: DataFrame, dataset: str) -> DataFrame:
    """Keep the first of identical records (same values in every source column).

    Duplicates are counted by the caller from the difference, so nothing goes
    unaccounted for.
    """
    content = list(BRONZE_COLUMNS[dataset])
    first = Window.partitionBy(*content).orderBy("_source_file", "_source_line")
    return bronze.withColumn("_rank", F.row_number().over(first)).where(F.col("_rank") == 1).drop("_rank")


def _lineage(extra: dict[str, Column] | None = None) -> list[Column]:
    cols = {
        "establishment_id": F.col("_establishment"),
        "_batch_id": F.col("_batch_id"),
        "_extracted_at": F.col("_extracted_at"),
        "_source_file": F.col("_source_file"),
        "_source_line": F.col("_source_line"),
        "_resource_id_hash": F.sha2(F.col("_resource_id"), 256),
    }
    cols.update(extra or {})
    return [c.alias(n) for n, c in cols.items()]


def _conform(df: DataFrame, dataset: str) -> DataFrame:
    """The staged schema's contract: its columns, in order, with their types."""
    return df.select([cast_to(F.col(f.name), f.dataType).alias(f.name) for f in staged_schema(dataset).fields])


def normalise_identifier(system: PersonIdentifierSystem, value: Column) -> Column:
    """A linkage identifier as compared across establishments (see :class:`PersonIdentifierSystem`)."""
    if system.normalise == "upper_alnum":
        value = F.upper(F.regexp_replace(value, r"[^A-Za-z0-9]", ""))
    elif system.normalise == "digits":
        value = F.regexp_replace(value, r"[^0-9]", "")
    return _blank_to_null(value)


def identifier_valid(system: PersonIdentifierSystem, value: Column, birth_date: Column, sex: Column) -> Column:
    """Whether a normalised identifier passes its system's pattern and check (never null)."""
    ok = value.isNotNull()
    if system.pattern:
        ok = ok & value.rlike(system.pattern)
    if system.check == "nam":
        ok = ok & is_valid_nam(value, birth_date, sex)
    elif system.check == "luhn":
        ok = ok & luhn_ok(value)
    return F.coalesce(ok, F.lit(False))


def pseudonymise_patients(bronze: DataFrame, keys: Keyring, parser: Parser,
                          systems: Sequence[PersonIdentifierSystem] = (DEFAULT_SYSTEM,)) -> DataFrame:
    """Patients: consortium ``person_id`` from the first valid linkage identifier, or an establishment-scoped fallback, flagged.

    ``systems`` are the consortium's ``person_identifiers`` in priority order.
    The NAM comes from the ``nam`` column, the others from the JSON object of
    ``person_identifiers``; the person id is the person key's HMAC of
    ``<system>:<normalised value>``, so one identifier gives one person_id in
    every establishment that sends it.
    """
    birth = parser.date(F.col("birth_date"))
    # Compared here because staged keeps neither date whole (year and month of birth, is_deceased); a death
    # before birth is a row error of the source: validate quarantines it (plausibility.date_order).
    death = F.coalesce(parser.date(F.col("deceased_date")), F.to_date(parser.timestamp(F.col("deceased_date"))))
    sex = F.lower(_blank_to_null(F.col("sex")))
    others = F.from_json(F.col(PERSON_IDENTIFIERS), "map<string,string>")
    candidates = []
    for system in systems:
        raw = F.col("nam") if system.id == PERSON_FROM_NAM else others[system.id]
        value = normalise_identifier(system, raw)
        candidates.append((system.id, identifier_valid(system, value, birth, sex), value))
    patient_ref = _blank_to_null(F.col("patient_ref"))
    person_from_mrn = hmac_sha256_hex(keys.establishment, F.concat(F.lit("mrn:"), patient_ref))
    chosen_value, chosen_system = F.lit(None).cast("string"), F.lit(None).cast("string")
    for system_id, valid, value in reversed(candidates):
        chosen_value = F.when(valid, value).otherwise(chosen_value)
        chosen_system = F.when(valid, F.lit(system_id)).otherwise(chosen_system)
    person_from_identifier = hmac_sha256_hex(keys.person, F.concat(chosen_system, F.lit(":"), chosen_value))
    valid = chosen_system.isNotNull()
    is_upsert = F.col("record_action") == "upsert"
    return bronze.select(
        F.when(is_upsert, F.when(valid, person_from_identifier).otherwise(person_from_mrn)).alias("person_id"),
        keys.record_id("patient", patient_ref).alias("patient_key"),
        F.when(is_upsert, F.when(valid, chosen_system).otherwise(F.lit(PERSON_FROM_MRN)))
        .alias("person_id_source"),
        sex.alias("gender_source_value"),
        F.year(birth).alias("year_of_birth"),
        F.month(birth).alias("month_of_birth"),
        F.substring(F.upper(F.regexp_replace(F.col("postal_code"), r"\s", "")), 1, 3).alias("_postal3"),
        _blank_to_null(F.col("deceased_date")).isNotNull().alias("is_deceased"),
        F.col("record_action"),
        F.when(is_upsert & ~valid, F.lit(FLAG_FALLBACK)).alias("person_id_flag"),
        _errors(_error("date:year_of_birth", F.col("birth_date"), birth),
                F.when(death < birth, F.lit(DEATH_BEFORE_BIRTH))).alias("_parse_errors"),
        *_lineage(),
    )


def suppress_rare_postal_prefixes(patients: DataFrame, known: DataFrame, k: int) -> DataFrame:
    """Keep a 3-character postal prefix only where at least ``k`` persons share it.

    ``known`` holds (person_id, postal_prefix) already in silver, so that an
    incremental batch is judged against the whole population, not itself.
    """
    population = (
        patients.select("person_id", F.col("_postal3").alias("postal_prefix"))
        .unionByName(known.select("person_id", "postal_prefix"))
        .where(F.col("person_id").isNotNull() & F.col("postal_prefix").isNotNull())
        .groupBy("postal_prefix").agg(F.countDistinct("person_id").alias("_persons"))
        .where(F.col("_persons") >= k)
        .select(F.col("postal_prefix").alias("_postal3"), F.lit(True).alias("_common"))
    )
    return (
        patients.join(F.broadcast(population), on="_postal3", how="left")
        .withColumn("postal_prefix", F.when(F.col("_common"), F.col("_postal3")))
        .drop("_postal3", "_common")
    )


def attach_person(facts: DataFrame, persons: DataFrame) -> DataFrame:
    """Find each fact's ``person_id`` through the establishment's patient key.

    A fact whose patient is unknown (not in the batch nor in silver) keeps a
    null ``person_id`` and the flag ``unknown_patient``: validation
    quarantines it for referential integrity.
    """
    joined = facts.join(persons, on="patient_key", how="left")
    unknown = (F.col("record_action") == "upsert") & F.col("person_id").isNull() & F.col("patient_key").isNotNull()
    return joined.withColumn("person_id_flag", F.when(unknown, F.lit(FLAG_UNKNOWN_PATIENT)))


def pseudonymise_facts(bronze: DataFrame, dataset: str, keys: Keyring, parser: Parser) -> DataFrame:
    """Encounters, diagnoses, lab results, medications, consents and observations: keyed ids, typed values,
    no free text (an observation keeps text only when it is one of the profile's closed list of answers)."""
    c = F.col
    patient_key = keys.record_id("patient", _blank_to_null(c("patient_ref"))).alias("patient_key")
    visit = keys.record_id("encounter", _blank_to_null(c("encounter_ref")))
    if dataset == "encounter":
        start, end = parser.timestamp(c("visit_start")), parser.timestamp(c("visit_end"))
        reason = F.upper(_blank_to_null(c("reason_code")))
        cols = [
            keys.record_id("encounter", _blank_to_null(c("encounter_ref"))).alias("visit_occurrence_id"),
            F.to_date(start).alias("visit_start_date"), start.alias("visit_start_datetime"),
            F.to_date(end).alias("visit_end_date"), end.alias("visit_end_datetime"),
            F.lower(_blank_to_null(c("visit_type"))).alias("visit_source_value"),
            _blank_to_null(c("care_site")).alias("care_site_source_value"),
            reason.alias("visit_reason_source_value"),
            # A constant system (a Synthea profile's SNOMED) says nothing about a visit without a reason.
            F.when(reason.isNotNull(), vocabulary(c("reason_system"))).alias("visit_reason_source_vocabulary"),
            _errors(_error("date:visit_start_date", c("visit_start"), start),
                    _error("date:visit_end_date", c("visit_end"), end)).alias("_parse_errors"),
        ]
    elif dataset == "diagnosis":
        onset = F.coalesce(parser.date(c("condition_date")), F.to_date(parser.timestamp(c("condition_date"))))
        ended = F.coalesce(parser.date(c("condition_end_date")),
                           F.to_date(parser.timestamp(c("condition_end_date"))))
        cols = [
            keys.record_id("diagnosis", _blank_to_null(c("diagnosis_ref"))).alias("condition_occurrence_id"),
            visit.alias("visit_occurrence_id"),
            onset.alias("condition_start_date"),
            ended.alias("condition_end_date"),
            F.upper(_blank_to_null(c("condition_code"))).alias("condition_source_value"),
            vocabulary(c("condition_system")).alias("condition_source_vocabulary"),
            F.lower(_blank_to_null(c("diagnosis_type"))).alias("condition_status_source_value"),
            _errors(_error("date:condition_start_date", c("condition_date"), onset),
                    _error("date:condition_end_date", c("condition_end_date"), ended)).alias("_parse_errors"),
        ]
    elif dataset == "lab_result":
        measured = parser.timestamp(c("measured_at"))
        concept = coded_answer(c("value"), c("value_system"))
        # A coded answer is a concept, never a number (266919005 is "Never smoker", not a count).
        value = F.when(concept.isNull(), parser.number(c("value")))
        # Qualitative results ("positive", "<0.5") are kept as text, not errors.
        numeric_looking = concept.isNull() & _blank_to_null(c("value")).rlike(r"^[-+]?[0-9][0-9.,]*$")
        cols = [
            keys.record_id("lab_result", _blank_to_null(c("lab_result_ref"))).alias("measurement_id"),
            visit.alias("visit_occurrence_id"),
            F.to_date(measured).alias("measurement_date"), measured.alias("measurement_datetime"),
            _blank_to_null(c("loinc_code")).alias("measurement_source_value"),
            F.when(_blank_to_null(c("loinc_code")).isNotNull(), F.lit("LOINC")).alias("measurement_source_vocabulary"),
            value.alias("value_as_number"),
            coded_value(c("value")).alias("value_source_value"),
            concept.alias("value_as_concept"),
            _blank_to_null(c("unit")).alias("unit_source_value"),
            F.lower(_blank_to_null(c("category"))).alias("category"),
            _errors(_error("date:measurement_datetime", c("measured_at"), measured),
                    F.when(numeric_looking & value.isNull(), F.lit("number:value_as_number"))).alias("_parse_errors"),
        ]
    elif dataset == "medication":
        start, end = parser.date(c("start_date")), parser.date(c("end_date"))
        start = F.coalesce(start, F.to_date(parser.timestamp(c("start_date"))))
        end = F.coalesce(end, F.to_date(parser.timestamp(c("end_date"))))
        dispensed = F.coalesce(parser.date(c("dispense_date")), F.to_date(parser.timestamp(c("dispense_date"))))
        dose = parser.number(c("dose"))
        cols = [
            keys.record_id("medication", _blank_to_null(c("medication_ref"))).alias("drug_exposure_id"),
            visit.alias("visit_occurrence_id"),
            start.alias("drug_exposure_start_date"), end.alias("drug_exposure_end_date"),
            dispensed.alias("drug_dispense_date"),
            F.upper(_blank_to_null(c("drug_code"))).alias("drug_source_value"),
            vocabulary(c("drug_system")).alias("drug_source_vocabulary"),
            dose.alias("dose_value"),
            _blank_to_null(c("dose_unit")).alias("dose_unit_source_value"),
            F.lower(_blank_to_null(c("route"))).alias("route_source_value"),
            _errors(_error("date:drug_exposure_start_date", c("start_date"), start),
                    _error("date:drug_exposure_end_date", c("end_date"), end),
                    _error("date:drug_dispense_date", c("dispense_date"), dispensed),
                    _error("number:dose_value", c("dose"), dose)).alias("_parse_errors"),
        ]
    elif dataset == "consent":
        decided, start, until = parser.date(c("decision_date")), parser.date(c("valid_from")), parser.date(c("valid_until"))
        decided = F.coalesce(decided, F.to_date(parser.timestamp(c("decision_date"))))
        cols = [
            keys.record_id("consent", _blank_to_null(c("consent_ref"))).alias("consent_id"),
            _blank_to_null(c("purpose")).alias("purpose"),
            F.lower(_blank_to_null(c("decision"))).alias("decision"),
            decided.alias("decision_date"), start.alias("valid_from"), until.alias("valid_until"),
            _errors(_error("date:decision_date", c("decision_date"), decided),
                    _error("date:valid_from", c("valid_from"), start),
                    _error("date:valid_until", c("valid_until"), until)).alias("_parse_errors"),
        ]
    elif dataset == "observation":
        observed = parser.timestamp(c("observed_at"))
        concept = coded_answer(c("value"), c("value_system"))
        number = F.when(concept.isNull(), parser.number(c("value")))
        cols = [
            keys.record_id("observation", _blank_to_null(c("observation_ref"))).alias("observation_id"),
            visit.alias("visit_occurrence_id"),
            F.to_date(observed).alias("observation_date"), observed.alias("observation_datetime"),
            _blank_to_null(c("observation_code")).alias("observation_source_value"),
            vocabulary(c("observation_system")).alias("observation_source_vocabulary"),
            F.lower(_blank_to_null(c("category"))).alias("category"),
            number.alias("value_as_number"),
            F.when(concept.isNull() & number.isNull(), parser.answer(c("value"))).alias("value_as_string"),
            concept.alias("value_as_concept"),
            _blank_to_null(c("unit")).alias("unit_source_value"),
            _errors(_error("date:observation_datetime", c("observed_at"), observed)).alias("_parse_errors"),
        ]
    else:
        raise ValueError(f"no pseudonymisation for dataset {dataset!r}")
    return bronze.select(patient_key, *cols, c("record_action"), *_lineage())


# -------------------------------------------------------------- entry ----

@dataclass(frozen=True)
class PseudonymiseOutcome:
    establishment_id: str
    batch_id: str
    staged: dict[str, int]
    duplicates: dict[str, int]
    skipped: bool = False


def _bronze_batch(spark: SparkSession, lake: Lake, dataset: str, establishment_id: str, batch_id: str) -> DataFrame | None:
    path = lake.bronze(dataset)
    if not table_exists(spark, path):
        return None
    return spark.read.format("delta").load(path).where(
        (F.col("_establishment") == establishment_id) & (F.col("_batch_id") == batch_id))


def _write_staged(spark: SparkSession, lake: Lake, dataset: str, df: DataFrame, establishment_id: str,
                  batch_id: str, fingerprint: str) -> int:
    """Replace the batch's rows of a staged table (one commit); the rows written, from that commit's metrics."""
    path = lake.staged(dataset)
    ready_table(spark, path, staged_schema(dataset), fingerprint, partition_by=TRANSIENT_PARTITIONS)
    # The write's own count: reading the batch back would cost a Spark job for a figure the commit holds.
    return written_rows(replace_rows(df, path, {"establishment_id": establishment_id, "_batch_id": batch_id}))


@writes_lake(Mode.SHARED)
def pseudonymise_batch(spark: SparkSession, lake: Lake, consortium: Consortium, key: PseudonymKey,
                       establishment_id: str, batch_id: str) -> PseudonymiseOutcome:
    """Bronze rows of one batch → staged tables.

    A batch already pseudonymised is skipped, so re-running changes nothing; a
    run that failed half-way left no log entry and is redone whole (each
    staged write replaces the batch's rows).
    """
    if batch_id in batches_with_status(lake, establishment_id, STAGE, Status.PSEUDONYMISED):
        return PseudonymiseOutcome(establishment_id, batch_id, {}, {}, skipped=True)
    est = consortium.establishment(establishment_id)
    keys = Keyring.for_establishment(spark, key, establishment_id)
    # Coded fields are checked here, before anything is staged: a name typed into one never leaves bronze.
    vocabulary = declared_vocabulary(consortium, establishment_id)
    parser = Parser(est)
    staged: dict[str, int] = {}
    duplicates: dict[str, int] = {}
    bronze_rows: dict[str, int] = {}

    # Bronze rows per dataset as ingest counted them after writing (rows read - quarantined), from the
    # batch log; a dataset the log does not account for is counted in bronze.
    from jobs.stages.batch_queue import ingested_entries

    counted = {dataset: int(e["rows_read"] or 0) - int(e["rows_quarantined"] or 0)
               for dataset, e in ingested_entries(lake, establishment_id, batch_id).items()}

    def deduped(dataset: str) -> DataFrame | None:
        bronze = _bronze_batch(spark, lake, dataset, establishment_id, batch_id)
        if bronze is None:
            return None
        bronze_rows[dataset] = counted[dataset] if dataset in counted else bronze.count()
        if bronze_rows[dataset] == 0:
            return None
        return drop_exact_duplicates(bronze, dataset)

    silver_patient_path = lake.silver("patient")
    silver_patients = (
        spark.read.format("delta").load(silver_patient_path)
        if table_exists(spark, silver_patient_path) else None
    )

    patients = deduped("patient")
    if patients is not None:
        pseudo = pseudonymise_patients(patients, keys, parser, consortium.pipeline.person_identifiers)
        known = (silver_patients.where(F.col("establishment_id") != establishment_id).select("person_id", "postal_prefix")
                 if silver_patients is not None else spark.createDataFrame([], "person_id string, postal_prefix string"))
        pseudo = suppress_rare_postal_prefixes(pseudo, known, consortium.pipeline.postal_prefix_min_persons)
        pseudo = guard_coded_fields(_conform(pseudo, "patient"), "patient", vocabulary)
        staged["patient"] = _write_staged(spark, lake, "patient", pseudo, establishment_id, batch_id,
                                          keys.fingerprint)

    # The person map: this batch's patients first, then those already in silver.
    batch_persons = (
        spark.read.format("delta").load(lake.staged("patient"))
        .where((F.col("establishment_id") == establishment_id) & (F.col("_batch_id") == batch_id)
               & F.col("person_id").isNotNull())
        .select("patient_key", "person_id")
        if table_exists(spark, lake.staged("patient")) else spark.createDataFrame([], "patient_key string, person_id string")
    )
    persons = batch_persons
    if silver_patients is not None:
        persons = persons.unionByName(
            silver_patients.where(F.col("establishment_id") == establishment_id)
            .select("patient_key", "person_id").join(batch_persons, on="patient_key", how="left_anti"))

    writes: dict[str, Callable[[], int]] = {}
    for dataset in DATASETS[1:]:
        facts = deduped(dataset)
        if facts is None:
            continue
        pseudo = attach_person(pseudonymise_facts(facts, dataset, keys, parser), persons)
        checked = vocabulary
        if dataset in UNIT_COLUMNS:
            # The batch's units are judged one by one by the UCUM grammar (a library, not a Spark function).
            sent = [r[0] for source in UNIT_COLUMNS[dataset].values()
                    for r in facts.select(F.trim(source)).distinct().collect()]
            checked = declared_vocabulary(consortium, establishment_id, sent)
        pseudo = guard_coded_fields(_conform(pseudo, dataset), dataset, checked)
        writes[dataset] = partial(_write_staged, spark, lake, dataset, pseudo, establishment_id, batch_id,
                                  keys.fingerprint)
    # One commit per staged table, the tables written side by side (jobs.core.tables.on_each_table).
    staged.update(on_each_table(writes))

    for dataset, rows in staged.items():
        duplicates[dataset] = bronze_rows[dataset] - rows
    append_batch_log(spark, lake, [
        {"establishment_id": establishment_id, "batch_id": batch_id, "dataset": dataset, "stage": STAGE,
         "status": Status.PSEUDONYMISED, "rows_read": bronze_rows[dataset], "rows_duplicates": duplicates[dataset],
         "message": f"{rows} rows staged, {duplicates[dataset]} exact duplicates dropped"}
        for dataset, rows in staged.items()
    ])
    return PseudonymiseOutcome(establishment_id, batch_id, staged, duplicates)
