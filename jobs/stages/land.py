"""Validated → silver: MERGE each batch's valid rows into the canonical tables, and account for every row.

Per silver table, keyed by ``(establishment_id, <record key>)``:

- an upsert inserts a new record, or replaces the stored one only when it was
  extracted later (``_extracted_at``): a late batch never overwrites newer data;
- a delete removes the stored record unless the record is newer than the
  delete; it also leaves a tombstone (``ops/silver_deletions``: dataset,
  keyed record id, extraction instant; no person data) so that an older batch
  landed afterwards cannot bring the record back;
- a ``full`` batch is a snapshot of every current record: after its MERGE, the
  establishment's records of each dataset it carries that it no longer holds
  are deleted, with their tombstones (:func:`delete_absent_records`) — unless
  lines of that dataset were quarantined at ingest (their keys are unknown, so
  absence cannot be told) or its file is empty; the batch log says which.
  Consent decisions are never deleted by absence (a refusal left out of a
  truncated export would become the purpose's default);
- re-landing a batch changes nothing: the batch log says it is landed, each
  MERGE carries Delta's idempotent transaction id (set for the batch's MERGEs
  only, which run side by side, one table each: the tombstones of every dataset
  go in one MERGE),
  and equal extraction instants never update.

Before writing, the batch must add up, per dataset: ``rows read = rows landed +
rows quarantined (ingest + validate) + exact duplicates dropped``
(:class:`ReconciliationError` otherwise), and every silver table must carry the
current key's fingerprint (:class:`jobs.privacy.keys.KeyMismatchError`): a failure
writes nothing. A row counts as landed when it is a valid row handed to the MERGE, whether it
inserted, updated, deleted or was older than silver and left it unchanged.

Unchanged rows are not rewritten: a stored record is updated only when the
batch's version differs in content (every column but key, establishment and
lineage, compared null-safe in the MERGE condition). An identical re-delivery
under a new batch id lands all its rows and changes none: no new file, nothing
in the change feed. The batch log's ``rows_unchanged`` counts the landed rows
that changed nothing, and silver's ``_batch_id`` / ``_extracted_at`` stay those
of the batch that last changed the record's content.

Silver tables have Change Data Feed on, researcher-readable table and column
comments, and are registered as ``silver.<dataset>`` (:func:`register_silver_tables`).

Example::

    land_batch(spark, lake, "chu_laurentides", "20260105-001", key.fingerprint)
    spark.sql("SELECT visit_source_value, count(*) FROM silver.encounter GROUP BY 1").show()
"""

from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager
from functools import partial, reduce
from dataclasses import dataclass, field
from typing import Callable

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType, TimestampType
from pyspark.sql.window import Window

from jobs.stages.batch_queue import ingested_entries, latest_batch_entries
from jobs.core.batchlog import BatchKind, Stage, Status
from jobs.core.lake import Lake
from jobs.core.ops import append_batch_log, batches_with_status, read_batch_log
from jobs.core.schemas import ACTION_DELETE, ACTION_UPSERT, DATASETS, SILVER_KEY, SILVER_SCHEMAS, silver_columns
from jobs.terminology.concepts import CONCEPT_COMMENTS, with_concepts
from jobs.terminology.maps import Terminology, default_terminology
from jobs.core.tables import DELETION_VECTORS, create_table, insert_values, merge_into, ready_table, require_fingerprint
from jobs.core.tables import on_each_table, table_exists
from jobs.core.tables import update_set
from jobs.stages.validate import validated_path
from jobs.core.writer_lock import Mode, writes_lake

STAGE = Stage.LAND
SILVER_SCHEMA_NAME = "silver"
DELETIONS = "silver_deletions"
CHANGE_DATA_FEED = "delta.enableChangeDataFeed"
# Idempotent transaction ids recorded in a table's log are forgotten after this.
TXN_RETENTION = "interval 30 days"

_TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
_TXN_VERSION = "spark.databricks.delta.write.txnVersion"

DELETIONS_SCHEMA = StructType([
    StructField("establishment_id", StringType(), False),
    StructField("dataset", StringType(), False),
    StructField("record_id", StringType(), False),
    StructField("deleted_at", TimestampType(), False),
    StructField("batch_id", StringType(), False),
])


class ReconciliationError(Exception):
    """Rows read do not add up to rows landed + quarantined + duplicates; nothing was landed."""


class BatchNotValidated(Exception):
    """Land was asked for a batch that validation did not pass."""


@dataclass(frozen=True)
class Figures:
    """How one dataset of one batch adds up."""

    read: int
    landed: int
    quarantined_ingest: int
    quarantined_validate: int
    duplicates: int
    # Of the rows landed, the deletes (a MERGE without any needs no tombstone write).
    deletes: int = 0

    @property
    def quarantined(self) -> int:
        return self.quarantined_ingest + self.quarantined_validate

    @property
    def holds(self) -> bool:
        return self.read == self.landed + self.quarantined + self.duplicates


@dataclass(frozen=True)
class LandOutcome:
    establishment_id: str
    batch_id: str
    landed: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    skipped: bool = False
    # Rows landed that changed nothing in silver (same content, older than silver, delete of an absent record).
    unchanged: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------ comments ----

TABLE_COMMENTS = {
    "patient": "Patients of each establishment: one row per patient record, pseudonymised. person_id links one "
               "person across establishments; birth is kept as year and month; postal code as a 3-character "
               "prefix shared by enough persons.",
    "encounter": "Hospital encounters (OMOP visit_occurrence): one row per visit and establishment.",
    "diagnosis": "Diagnoses (OMOP condition_occurrence) with their code and code system.",
    "lab_result": "Laboratory results (OMOP measurement) coded in LOINC, numeric value and unit as reported.",
    "medication": "Medication orders and exposures (OMOP drug_exposure) coded in ATC, DIN or RxNorm.",
    "consent": "Consent decisions of patients per purpose, with their validity.",
    "observation": "Observations (OMOP observation) that are not LOINC measurements: SNOMED CT observables, "
                   "survey and social-history answers, scores. An answer is a number, a concept "
                   "(value_as_concept) or a word of the establishment's closed list (value_as_string).",
}

COLUMN_COMMENTS = {
    "person_id": "Consortium pseudonym of the person (keyed hash of its first valid linkage identifier: the "
                 "health-insurance number, an enterprise MPI number…; or of the establishment's record number "
                 "when none was valid). Same identifier, same id across establishments.",
    "establishment_id": "Establishment that sent the record.",
    "_batch_id": "Delivery batch that last changed the record.",
    "_extracted_at": "When the establishment extracted this version of the record (UTC); a later extract with "
                     "other content replaces it, one with the same content leaves it as it is.",
    "patient_key": "Pseudonymised patient record id, keyed per establishment.",
    "person_id_source": "How person_id was derived: the linkage identifier system ('nam', 'enterprise_mpi'… "
                        "as config/pipeline.yaml names them) or 'establishment_fallback'.",
    "gender_source_value": "Sex as recorded: female, male, other or unknown.",
    "year_of_birth": "Year of birth.",
    "month_of_birth": "Month of birth (1-12).",
    "postal_prefix": "First three characters of the postal code (Canadian FSA); null where too few persons share it.",
    "is_deceased": "True when the establishment recorded a death.",
    "visit_occurrence_id": "Pseudonymised encounter id, keyed per establishment.",
    "visit_start_date": "Date the encounter started.",
    "visit_start_datetime": "Date and time the encounter started.",
    "visit_end_date": "Date the encounter ended; null while it is ongoing.",
    "visit_end_datetime": "Date and time the encounter ended; null while it is ongoing.",
    "visit_source_value": "Encounter type as recorded (e.g. inpatient, outpatient, emergency).",
    "care_site_source_value": "Unit or care site as recorded by the establishment.",
    "visit_reason_source_value": "Coded reason for the visit as sent (SNOMED CT or ICD-10; FHIR "
                                 "Encounter.reasonCode, Synthea REASONCODE); null when none was coded. A "
                                 "quasi-identifier in project extracts, with the diagnosis codes.",
    "visit_reason_source_vocabulary": "Code system of visit_reason_source_value: SNOMED, ICD10CA, ICD10 or ICD10CM.",
    "condition_occurrence_id": "Pseudonymised diagnosis id, keyed per establishment.",
    "condition_start_date": "Date of the diagnosis (onset or recording).",
    "condition_end_date": "Date the condition resolved (FHIR abatement, Synthea STOP); null while it is active "
                          "or when the source does not say.",
    "condition_source_value": "Diagnosis code as sent (ICD-10-CA, ICD-10 or SNOMED CT).",
    "condition_source_vocabulary": "Code system of condition_source_value: ICD10CA, ICD10 or SNOMED.",
    "condition_status_source_value": "Diagnosis type as recorded (e.g. principal, secondary).",
    "measurement_id": "Pseudonymised laboratory result id, keyed per establishment.",
    "measurement_date": "Date the sample was taken.",
    "measurement_datetime": "Date and time the sample was taken.",
    "measurement_source_value": "LOINC code of the test.",
    "measurement_source_vocabulary": "Code system of measurement_source_value (LOINC).",
    "value_as_number": "Numeric result in the canonical UCUM unit of its LOINC code (unit_concept_code); null for "
                       "qualitative results and for units that do not convert (value_source_as_number keeps it).",
    "value_source_value": "Result as reported (text), for qualitative results such as 'positive' or '<0.5'.",
    "unit_source_value": "Unit as reported (UCUM where the establishment uses it).",
    "category": "Observation category, a FHIR observation-category code: laboratory, vital-signs, survey, "
                "social-history, exam, imaging, procedure, therapy or activity; null when the source gives none.",
    "value_as_concept": "Coded answer as <vocabulary>|<code> (e.g. SNOMED|266919005 for 'Never smoker'); null when "
                        "the result is a number or a word. Never read as a number.",
    "observation_id": "Pseudonymised observation id, keyed per establishment.",
    "observation_date": "Date of the observation.",
    "observation_datetime": "Date and time of the observation.",
    "observation_source_value": "Code of the observation as sent (SNOMED CT, LOINC survey question, or a code the "
                                "establishment's profile routes here, such as QALY).",
    "observation_source_vocabulary": "Code system of observation_source_value (SNOMED, LOINC…; the system as sent "
                                     "when unknown).",
    "value_as_string": "Word answer from the establishment's declared closed list (e.g. 'Never smoker', 'Yes'), or "
                       "true/false; any other text is dropped at ingest as possible free text.",
    "drug_exposure_id": "Pseudonymised medication id, keyed per establishment.",
    "drug_exposure_start_date": "Date the medication started.",
    "drug_exposure_end_date": "Date the medication ended (FHIR: the dosage's end, else the end of the order's "
                              "validity); null when open-ended.",
    "drug_dispense_date": "Date the drug was dispensed, where the source records it (a CSV column); from a FHIR "
                          "MedicationRequest, the first day the order may be dispensed "
                          "(dispenseRequest.validityPeriod.start). Null when unknown.",
    "drug_source_value": "Drug code as sent (ATC substance or Health Canada DIN).",
    "drug_source_vocabulary": "Code system of drug_source_value: ATC or DIN.",
    "dose_value": "Dose per administration.",
    "dose_unit_source_value": "Unit of dose_value as reported.",
    "route_source_value": "Route of administration as reported (e.g. po, sc, iv).",
    "consent_id": "Pseudonymised consent record id, keyed per establishment.",
    "purpose": "Purpose the decision is about (see config/purposes.yaml).",
    "decision": "permit, deny or withdraw.",
    "decision_date": "Date the decision was made.",
    "valid_from": "First day the decision applies.",
    "valid_until": "Last day the decision applies; null when open-ended.",
}


def column_comment(dataset: str, column: str) -> str:
    if dataset == "observation" and column == "value_as_number":
        return "Numeric answer or score as reported (unit_source_value), not converted."
    if column == "visit_occurrence_id" and dataset != "encounter":
        return "Encounter the record belongs to (silver.encounter.visit_occurrence_id); null when none was given."
    return COLUMN_COMMENTS.get(column) or CONCEPT_COMMENTS.get(column, "")


# -------------------------------------------------------------- tables ----

def ensure_silver_table(spark: SparkSession, lake: Lake, dataset: str, key_fingerprint: str,
                        deletion_vectors: bool = True) -> None:
    """Create the silver table (exact schema, comments, CDF, fingerprint) if missing.

    With deletion vectors (the default) a MERGE that updates or deletes a few
    records marks them in a small side file instead of rewriting every data
    file they sit in, so an incremental batch costs what it changes, not what
    silver holds. The rows so marked stay in their Parquet files until they are
    rewritten: erasure and maintenance purge them (``REORG ... APPLY (PURGE)``)
    before VACUUM.
    """
    ready_table(spark, lake.silver(dataset), SILVER_SCHEMAS[dataset], key_fingerprint, partition_by=("establishment_id",),
                comment=TABLE_COMMENTS[dataset], column_comment=lambda name: column_comment(dataset, name),
                properties={
                    CHANGE_DATA_FEED: "true",
                    DELETION_VECTORS: str(deletion_vectors).lower(),
                    "delta.setTransactionRetentionDuration": TXN_RETENTION,
                })


def _location(path: str) -> str:
    if "://" in path or path.startswith("file:"):
        return path.removeprefix("file:").rstrip("/") if path.startswith("file:/") else path.rstrip("/")
    return os.path.abspath(path).rstrip("/")


def register_silver_tables(spark: SparkSession, lake: Lake) -> list[str]:
    """Register every existing silver table as ``silver.<dataset>``; idempotent.

    A name already registered at another location (another lake) is pointed at
    this one; dropping the name of a table created with a LOCATION leaves its data.
    """
    spark.sql(f"CREATE SCHEMA IF NOT EXISTS {SILVER_SCHEMA_NAME}")
    registered = _registered_locations(spark)
    names = []
    for dataset in DATASETS:
        path = lake.silver(dataset)
        if not table_exists(spark, path):
            continue
        name = f"{SILVER_SCHEMA_NAME}.{dataset}"
        location = _location(path)
        if dataset in registered:
            current = registered[dataset]
            if current is not None and _location(current) == location:
                names.append(name)
                continue
            spark.sql(f"DROP TABLE {name}")
        spark.sql(f"CREATE TABLE IF NOT EXISTS {name} USING DELTA LOCATION '{location}'")
        names.append(name)
    return names


def _registered_locations(spark: SparkSession) -> dict[str, str | None]:
    """Each table registered in the silver schema and its location (None when the catalog gives none), from
    one ``SHOW TABLE EXTENDED``: asking each name (``DESCRIBE DETAIL``, which also sizes every file) costs
    two round trips a table at every land."""
    found: dict[str, str | None] = {}
    for row in spark.sql(f"SHOW TABLE EXTENDED IN {SILVER_SCHEMA_NAME} LIKE '*'").collect():
        locations = [line.removeprefix("Location:").strip() for line in (row.information or "").splitlines()
                     if line.startswith("Location:")]
        found[row.tableName] = locations[0] if locations else None
    return found


@contextmanager
def _idempotent_write(spark: SparkSession, app_id: str, version: int = 1):
    """Delta's idempotent-write ids for exactly one write, then cleared (they stick to the session)."""
    spark.conf.set(_TXN_APP_ID, app_id)
    spark.conf.set(_TXN_VERSION, str(version))
    try:
        yield
    finally:
        spark.conf.unset(_TXN_APP_ID)
        spark.conf.unset(_TXN_VERSION)


# --------------------------------------------------------------- merge ----

def _deletions(spark: SparkSession, lake: Lake) -> str:
    """The tombstone table's path, created when missing."""
    path = lake.ops(DELETIONS)
    if not table_exists(spark, path):
        create_table(spark, path, DELETIONS_SCHEMA, partition_by=("establishment_id",),
                     comment="Record ids deleted from silver and when (no person data): "
                             "an older batch may not bring them back.")
    return path


def _merge_tombstones(spark: SparkSession, path: str, tombstones: DataFrame, establishment_id: str,
                      datasets: list[str]) -> None:
    """Record ``tombstones`` (:data:`DELETIONS_SCHEMA`) of ``datasets``: a later deletion of a record replaces
    an earlier one."""
    listed = ", ".join(f"'{d}'" for d in sorted(datasets))
    merge_into(spark, path, tombstones.select(*DELETIONS_SCHEMA.fieldNames()),
               f"t.establishment_id = '{establishment_id}' AND t.dataset IN ({listed}) "
               "AND t.establishment_id = s.establishment_id AND t.dataset = s.dataset AND t.record_id = s.record_id",
               "WHEN MATCHED AND s.deleted_at > t.deleted_at THEN UPDATE SET *",
               "WHEN NOT MATCHED THEN INSERT *")


def batch_tombstones(rows: dict[str, DataFrame]) -> DataFrame:
    """The deletes among a batch's rows of each dataset (``record_action = 'delete'``), as tombstones
    (:data:`DELETIONS_SCHEMA`), in one frame."""
    parts = [frame.where(F.col("record_action") == ACTION_DELETE).select(
        F.col("establishment_id"), F.lit(dataset).alias("dataset"), F.col(SILVER_KEY[dataset]).alias("record_id"),
        F.col("_extracted_at").alias("deleted_at"), F.col("_batch_id").alias("batch_id"))
        for dataset, frame in rows.items()]
    return reduce(DataFrame.unionByName, parts)


# Lineage says which delivery brought a version, not what the record holds: a record whose content
# is the same as silver's is not rewritten because a later batch carried it again.
LINEAGE_SILVER_COLUMNS = frozenset({"_batch_id", "_extracted_at"})


def content_columns(dataset: str) -> tuple[str, ...]:
    """The silver columns compared to tell a changed record from the same one delivered again:
    every column but the record key, the establishment and lineage."""
    same_record = {SILVER_KEY[dataset], "establishment_id"}
    return tuple(c for c in silver_columns(dataset) if c not in LINEAGE_SILVER_COLUMNS | same_record)


def content_differs(dataset: str, target: str = "t", source: str = "s") -> str:
    """SQL condition true when the source row's content differs from the target's.

    Null-safe (``<=>``: null equals null) and column by column, so it is exact: no hash
    collision can make a changed record look unchanged.
    """
    same = " AND ".join(f"{target}.`{c}` <=> {source}.`{c}`" for c in content_columns(dataset))
    return f"NOT ({same})"


@dataclass(frozen=True)
class MergeCounts:
    """What one MERGE changed in silver (Delta's operation metrics); zeros when it was already committed."""

    inserted: int = 0
    updated: int = 0
    deleted: int = 0

    @property
    def changed(self) -> int:
        return self.inserted + self.updated + self.deleted


def _merge_counts(row) -> MergeCounts:
    if row is None:
        return MergeCounts()
    values = row.asDict()
    return MergeCounts(int(values.get("num_inserted_rows") or 0), int(values.get("num_updated_rows") or 0),
                       int(values.get("num_deleted_rows") or 0))


def batch_app_id(establishment_id: str, batch_id: str) -> str:
    """The idempotent-write id of a batch's silver MERGEs (one per table: each table's log records its own)."""
    return f"affluent.land.{establishment_id}.{batch_id}"


def merge_into_silver(spark: SparkSession, lake: Lake, dataset: str, rows: DataFrame, establishment_id: str,
                      batch_id: str, terminology: Terminology | None = None, *,
                      deletes: int | None = None) -> MergeCounts:
    """MERGE one batch's valid rows of ``dataset`` into silver (see the module's rules), then record its tombstones.

    ``rows`` have the silver source columns plus ``record_action``, one row per record key;
    their standard concepts are derived here (``terminology``, or the configuration's maps).
    ``deletes``, when the caller counted them, is how many rows are deletes: none means no tombstone
    to write and no Spark job to look for one.
    A stored record is updated only when the batch's version is newer *and* its content
    (:func:`content_columns`, concepts included) differs: the same record delivered again changes
    no row, no file and nothing in the change feed. Returns what the MERGE inserted, updated and deleted.
    """
    path = _deletions(spark, lake)
    tombstones = batch_tombstones({dataset: rows}) if deletes != 0 else None
    if tombstones is not None and deletes is None and tombstones.isEmpty():
        tombstones = None
    with _idempotent_write(spark, batch_app_id(establishment_id, batch_id)):
        counts = merge_silver_rows(spark, lake, dataset, rows, establishment_id, terminology)
        if tombstones is not None:
            _merge_tombstones(spark, path, tombstones, establishment_id, [dataset])
    return counts


def merge_silver_rows(spark: SparkSession, lake: Lake, dataset: str, rows: DataFrame, establishment_id: str,
                      terminology: Terminology | None = None) -> MergeCounts:
    """The MERGE of :func:`merge_into_silver`, no more: the caller scopes its idempotent-write id, and the
    silver and tombstone tables exist.

    The MERGEs of one batch's datasets may run side by side under one id (:func:`land_batch`):
    each table's log records it on its own.
    """
    rows = with_concepts(rows, dataset, terminology or default_terminology())
    key = SILVER_KEY[dataset]
    columns = list(silver_columns(dataset))
    tombstones = (spark.read.format("delta").load(lake.ops(DELETIONS))
                  .where((F.col("establishment_id") == establishment_id) & (F.col("dataset") == dataset))
                  .select(F.col("record_id").alias(key), F.col("deleted_at").alias("_deleted_at")))
    source = (rows.select(*columns, "record_action")
              .join(tombstones, on=key, how="left")
              .select(*columns, "record_action", "_deleted_at"))
    same_record = f"t.establishment_id = '{establishment_id}' AND t.establishment_id = s.establishment_id AND t.{key} = s.{key}"
    metrics = merge_into(
        spark, lake.silver(dataset), source, same_record,
        f"WHEN MATCHED AND s.record_action = '{ACTION_DELETE}' AND s._extracted_at >= t._extracted_at "
        "THEN DELETE",
        f"WHEN MATCHED AND s.record_action = '{ACTION_UPSERT}' AND s._extracted_at > t._extracted_at "
        f"AND {content_differs(dataset)} THEN UPDATE SET {update_set(columns)}",
        f"WHEN NOT MATCHED AND s.record_action = '{ACTION_UPSERT}' "
        f"AND (s._deleted_at IS NULL OR s._extracted_at > s._deleted_at) THEN INSERT {insert_values(columns)}")
    return _merge_counts(metrics)


# Consent decisions are never deleted because a snapshot left them out: a refusal missing from a
# truncated export would turn into the purpose's default. They change by later decisions or deletes.
NOT_BY_ABSENCE = frozenset({"consent"})


def delete_absent_records(spark: SparkSession, lake: Lake, dataset: str, establishment_id: str, batch_id: str,
                          extracted_at) -> int:
    """A full snapshot's deletions: the establishment's silver records of ``dataset`` that the snapshot
    no longer holds are deleted (with their tombstone), as if it had sent a delete for each.

    "Holds" means any row of the batch carrying the record's key at pseudonymisation, valid or
    not: a record quarantined at validation is still current at the source and keeps its silver
    version. Only records extracted before the snapshot are considered. Returns the number deleted.
    """
    key = SILVER_KEY[dataset]
    # Checkpointed: the set is fixed before the MERGE changes silver, for the tombstones that follow it.
    absent = _absent_records(spark, lake, dataset, establishment_id, batch_id, extracted_at).localCheckpoint()
    gone = absent.count()
    if gone == 0:
        return 0
    app_id = f"affluent.land.{establishment_id}.{batch_id}.{dataset}.absent"
    with _idempotent_write(spark, app_id):
        merge_into(spark, lake.silver(dataset), absent,
                   f"t.establishment_id = '{establishment_id}' AND t.establishment_id = s.establishment_id "
                   f"AND t.{key} = s.record_id",
                   "WHEN MATCHED AND t._extracted_at < s.deleted_at THEN DELETE")
    path = _deletions(spark, lake)  # created, when missing, before the id is set
    with _idempotent_write(spark, app_id):
        _merge_tombstones(spark, path, absent, establishment_id, [dataset])
    return gone


def _absent_records(spark: SparkSession, lake: Lake, dataset: str, establishment_id: str, batch_id: str,
                    extracted_at) -> DataFrame:
    """The establishment's silver records of ``dataset`` extracted before a full snapshot that it does not hold,
    as tombstones (:data:`DELETIONS_SCHEMA`)."""
    key = SILVER_KEY[dataset]
    present = (spark.read.format("delta").load(lake.staged(dataset))
               .where((F.col("establishment_id") == establishment_id) & (F.col("_batch_id") == batch_id)
                      & F.col(key).isNotNull())
               .select(key).distinct())
    return (spark.read.format("delta").load(lake.silver(dataset))
            .where((F.col("establishment_id") == establishment_id) & (F.col("_extracted_at") < F.lit(extracted_at)))
            .select("establishment_id", key).join(present, on=key, how="left_anti")
            .select("establishment_id", F.col(key).alias("record_id"), F.lit(dataset).alias("dataset"),
                    F.lit(extracted_at).cast("timestamp").alias("deleted_at"), F.lit(batch_id).alias("batch_id")))


def absent_counts(spark: SparkSession, lake: Lake, datasets: list[str], establishment_id: str, batch_id: str,
                  extracted_at) -> dict[str, int]:
    """How many records of each dataset a full snapshot no longer holds, in one query over every dataset.

    Most snapshots delete nothing: only a dataset counted here goes on to :func:`delete_absent_records`
    (a checkpoint, a count and two MERGEs), instead of every dataset paying for the first two.
    """
    # A dataset whose files hold no record of the establishment extracted before the snapshot (its first
    # snapshot, say) has none to miss: the log's statistics say so without a query.
    queried = [d for d in datasets if may_hold_older(lake.silver(d), establishment_id, extracted_at)]
    if not queried:
        return {d: 0 for d in datasets}
    frames = [_absent_records(spark, lake, d, establishment_id, batch_id, extracted_at).select("dataset")
              for d in queried]
    union = frames[0]
    for frame in frames[1:]:
        union = union.unionByName(frame)
    counted = {r.dataset: int(r["count"]) for r in union.groupBy("dataset").count().collect()}
    return {d: counted.get(d, 0) for d in datasets}


def may_hold_older(path: str, establishment_id: str, extracted_at: dt.datetime | None) -> bool:
    """Whether a silver table may hold a record of the establishment extracted before ``extracted_at``: from
    its files' ``establishment_id`` partition values and ``_extracted_at`` minimums, read from the log with
    delta-rs (no Spark job). A file without that statistic may; no snapshot time, no record is older."""
    import pyarrow as pa

    from jobs.core.arrow_tables import open_delta
    from jobs.stages.batch_queue import utc

    table = open_delta(path)
    if table is None or extracted_at is None:
        return False
    actions = pa.table(table.get_add_actions(flatten=True)).to_pydict()
    files = len(actions.get("path") or [])
    establishments = actions.get("partition.establishment_id") or [establishment_id] * files
    oldest = actions.get("min._extracted_at") or [None] * files
    return any(e == establishment_id and (low is None or utc(low) < utc(extracted_at))
               for e, low in zip(establishments, oldest))


def _snapshot(lake: Lake, establishment_id: str, batch_id: str):
    """``(kind, extracted_at)`` of a batch, as its ingest entries say."""
    for entry in ingested_entries(lake, establishment_id, batch_id).values():
        return entry["kind"], entry["extracted_at"]
    return None, None


# ------------------------------------------------------------- figures ----

def _latest_entries(log: DataFrame) -> DataFrame:
    latest = Window.partitionBy("establishment_id", "batch_id", "dataset", "stage").orderBy(F.col("recorded_at").desc())
    return log.withColumn("_n", F.row_number().over(latest)).where(F.col("_n") == 1).drop("_n")


def batch_figures(spark: SparkSession, lake: Lake, establishment_id: str, batch_id: str) -> dict[str, Figures]:
    """Per dataset: rows read, valid, quarantined (ingest, validate) and duplicates of one batch."""
    log = {key: entry for key, entry in latest_batch_entries(lake, establishment_id, batch_id).items() if key[0]}
    logged = sorted({d for d, stage in log if d and stage in (Stage.INGEST, Stage.VALIDATE)})
    # A dataset of which ingest passed no row on (an empty file) has none waiting in validated/: not read.
    passed_on = [d for d in logged if (e := log.get((d, Stage.INGEST.value))) is None
                 or int(e["rows_read"] or 0) > int(e["rows_quarantined"] or 0)]
    # Rows quarantined at validation and rows waiting in validated/, in one query (one Spark job).
    validate_q, valid, deletes = _batch_rows(spark, lake, establishment_id, batch_id, passed_on)
    datasets = sorted(set(logged) | set(validate_q))
    figures = {}
    for dataset in datasets:
        ingest = log.get((dataset, Stage.INGEST.value))
        dedup = log.get((dataset, Stage.PSEUDONYMISE.value))
        landed = valid.get(dataset, 0)
        if ingest is None:
            raise ReconciliationError(
                f"batch {establishment_id}/{batch_id}, dataset {dataset}: no ingest entry in the batch log, so the "
                "rows read are unknown. Ingest the batch through the pipeline before landing it.")
        figures[dataset] = Figures(int(ingest["rows_read"] or 0), landed, int(ingest["rows_quarantined"] or 0),
                                   int(validate_q.get(dataset, 0)), int((dedup["rows_duplicates"] if dedup else 0) or 0),
                                   int(deletes.get(dataset, 0)))
    return figures


def _batch_rows(spark: SparkSession, lake: Lake, establishment_id: str, batch_id: str,
               datasets: list[str]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Rows of the batch quarantined at validation, rows waiting in ``validated/`` and the deletes among
    them, per dataset.

    One query over the quarantine table and every dataset's validated table, whatever their number.
    """
    parts = []
    if table_exists(spark, lake.quarantine()):
        parts.append(spark.read.format("delta").load(lake.quarantine())
                     .where((F.col("establishment_id") == establishment_id) & (F.col("batch_id") == batch_id)
                            & (F.col("stage") == Stage.VALIDATE.value))
                     .select(F.lit("quarantine").alias("zone"), "dataset", F.lit(False).alias("is_delete")))
    parts += [spark.read.format("delta").load(path)
              .where((F.col("establishment_id") == establishment_id) & (F.col("_batch_id") == batch_id))
              .select(F.lit("validated").alias("zone"), F.lit(d).alias("dataset"),
                      (F.col("record_action") == ACTION_DELETE).alias("is_delete"))
              for d, path in ((d, validated_path(lake, d)) for d in datasets) if table_exists(spark, path)]
    quarantined: dict[str, int] = {}
    valid: dict[str, int] = {}
    deletes: dict[str, int] = {}
    if not parts:
        return quarantined, valid, deletes
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    counted = union.groupBy("zone", "dataset").agg(F.count(F.lit(1)).alias("rows"),
                                                   F.count_if(F.col("is_delete")).alias("deletes"))
    for r in counted.collect():
        if r.zone == "quarantine":
            quarantined[r.dataset] = r.rows
        else:
            valid[r.dataset], deletes[r.dataset] = r.rows, r.deletes
    return quarantined, valid, deletes


def _require_validated(lake: Lake, establishment_id: str, batch_id: str) -> None:
    statuses = {e["status"] for (_, stage), e in latest_batch_entries(lake, establishment_id, batch_id).items()
                if stage == Stage.VALIDATE}
    if statuses != {Status.VALIDATED}:
        found = ", ".join(sorted(statuses)) or "no validation"
        raise BatchNotValidated(f"batch {establishment_id}/{batch_id} cannot land: validation status is {found}. "
                                "Run validate (and fix what it reports) first.")


# --------------------------------------------------------------- entry ----

@writes_lake(Mode.SHARED)
def land_batch(spark: SparkSession, lake: Lake, establishment_id: str, batch_id: str,
               key_fingerprint: str, terminology: Terminology | None = None) -> LandOutcome:
    """MERGE one validated batch into silver and log a 'land' entry per dataset.

    The standard concepts are derived on the way (:func:`jobs.terminology.concepts.with_concepts`,
    with ``terminology`` or the configuration's maps): an unmapped value lands with concept 0.

    Raises :class:`ReconciliationError` when a dataset does not add up and
    :class:`jobs.privacy.keys.KeyMismatchError` when a silver table was written with
    another key; in both cases nothing is written to silver. Landing a batch
    already landed changes nothing.
    """
    if batch_id in batches_with_status(lake, establishment_id, STAGE, Status.LANDED):
        return LandOutcome(establishment_id, batch_id, skipped=True)
    _require_validated(lake, establishment_id, batch_id)
    figures = batch_figures(spark, lake, establishment_id, batch_id)

    broken = {d: f for d, f in figures.items() if not f.holds}
    if broken:
        details = "; ".join(f"{d}: read {f.read} != landed {f.landed} + quarantined {f.quarantined} "
                            f"(ingest {f.quarantined_ingest}, validate {f.quarantined_validate}) + duplicates "
                            f"{f.duplicates}" for d, f in broken.items())
        append_batch_log(spark, lake, [
            {"establishment_id": establishment_id, "batch_id": batch_id, "dataset": d, "stage": STAGE,
             "status": Status.STOPPED, "rows_read": f.read, "rows_landed": 0, "rows_quarantined": f.quarantined,
             "rows_duplicates": f.duplicates, "message": "does not reconcile; nothing landed"}
            for d, f in broken.items()])
        raise ReconciliationError(f"batch {establishment_id}/{batch_id} does not reconcile, nothing landed: "
                                  f"{details}. Look for rows lost between stages before landing again.")

    to_land = [d for d, f in figures.items() if f.landed > 0]
    for dataset in to_land:
        require_fingerprint(lake.silver(dataset), key_fingerprint)
    # Every table exists before the idempotent-write id is set: a table created under it would record the
    # id, and its own MERGE would then be skipped as already done.
    for dataset in to_land:
        ensure_silver_table(spark, lake, dataset, key_fingerprint)
    deletions = _deletions(spark, lake)
    rows = {d: spark.read.format("delta").load(validated_path(lake, d)).where(
        (F.col("establishment_id") == establishment_id) & (F.col("_batch_id") == batch_id)) for d in to_land}
    # Each MERGE writes a table of its own (a silver table per dataset; the batch's deletes, every dataset's,
    # in one MERGE into the tombstone table): side by side (jobs.core.tables.on_each_table), under the batch's
    # one id. The order does not matter: a batch never carries two rows of one record.
    merges: dict[str, Callable[[], MergeCounts | None]] = {
        d: partial(merge_silver_rows, spark, lake, d, rows[d], establishment_id, terminology) for d in to_land}
    deleting = [d for d in to_land if figures[d].deletes]
    if deleting:
        merges[DELETIONS] = partial(_merge_tombstones, spark, deletions,
                                    batch_tombstones({d: rows[d] for d in deleting}), establishment_id, deleting)
    with _idempotent_write(spark, batch_app_id(establishment_id, batch_id)):
        merged = on_each_table(merges)
    counts = {d: merged[d] or MergeCounts() for d in to_land}
    unchanged = {d: f.landed - counts.get(d, MergeCounts()).changed for d, f in figures.items()}

    # A full batch is a snapshot: what it no longer holds was deleted at the source. Not when a row's
    # key is unknown (a line quarantined at ingest may be one of the records) or the file is empty.
    snapshot_notes: dict[str, str] = {}
    kind, extracted_at = _snapshot(lake, establishment_id, batch_id)
    if kind == BatchKind.FULL:
        judged = []
        for dataset, f in figures.items():
            if dataset in NOT_BY_ABSENCE or not table_exists(spark, lake.silver(dataset)):
                continue
            if f.quarantined_ingest or f.read == 0:
                snapshot_notes[dataset] = ("; full snapshot: records absent from it were not deleted ("
                                           + ("an empty file" if f.read == 0 else
                                              f"{f.quarantined_ingest} line(s) quarantined at ingest may be "
                                              "some of them") + ")")
                continue
            judged.append(dataset)
        for dataset, absent in absent_counts(spark, lake, judged, establishment_id, batch_id, extracted_at).items():
            gone = (delete_absent_records(spark, lake, dataset, establishment_id, batch_id, extracted_at)
                    if absent else 0)
            snapshot_notes[dataset] = f"; full snapshot: {gone} record(s) absent from it deleted"

    append_batch_log(spark, lake, [
        {"establishment_id": establishment_id, "batch_id": batch_id, "dataset": d, "stage": STAGE,
         "status": Status.LANDED, "rows_read": f.read, "rows_landed": f.landed, "rows_quarantined": f.quarantined,
         "rows_duplicates": f.duplicates, "rows_unchanged": unchanged[d],
         "message": f"read {f.read} = landed {f.landed} + quarantined {f.quarantined_ingest} at ingest and "
                    f"{f.quarantined_validate} at validate + {f.duplicates} duplicates"
                    + (_changes_note(counts.get(d, MergeCounts()), unchanged[d]) if f.landed else "")
                    + snapshot_notes.get(d, "")}
        for d, f in figures.items()])
    register_silver_tables(spark, lake)
    return LandOutcome(establishment_id, batch_id,
                       {d: f.landed for d, f in figures.items()},
                       {d: f.quarantined for d, f in figures.items()},
                       {d: f.duplicates for d, f in figures.items()},
                       unchanged=unchanged)


def _changes_note(counts: MergeCounts, unchanged: int) -> str:
    """What the landed rows did to silver, for the batch log's message."""
    note = (f"; silver: {counts.inserted} inserted, {counts.updated} updated, {counts.deleted} deleted, "
            f"{unchanged} unchanged")
    if unchanged and not counts.changed:
        note += " (the batch repeats what silver holds: no row changed)"
    return note


def reconcile(spark: SparkSession, lake: Lake, establishment_id: str | None = None) -> DataFrame:
    """Per landed batch and dataset: rows read, landed, quarantined, duplicates, and whether they add up.

    ``holds`` is ``rows_read = rows_landed + rows_quarantined + rows_duplicates``,
    with rows read taken from the ingest entry and the others from the land entry.
    """
    log = read_batch_log(spark, lake)
    if establishment_id is not None:
        log = log.where(F.col("establishment_id") == establishment_id)
    latest = _latest_entries(log.where(F.col("dataset").isNotNull()))
    keys = ["establishment_id", "batch_id", "dataset"]
    ingest = latest.where(F.col("stage") == Stage.INGEST.value).select(*keys, F.col("rows_read"))
    landed = latest.where((F.col("stage") == STAGE.value) & (F.col("status") == Status.LANDED.value)).select(
        *keys, "rows_landed", "rows_quarantined", "rows_duplicates", F.col("recorded_at").alias("landed_at"))
    return (landed.join(ingest, on=keys, how="left")
            .select(*keys, "rows_read", "rows_landed", "rows_quarantined", "rows_duplicates",
                    F.coalesce(F.col("rows_read") == F.col("rows_landed") + F.col("rows_quarantined")
                               + F.col("rows_duplicates"), F.lit(False)).alias("holds"),
                    "landed_at")
            .orderBy(*keys))
