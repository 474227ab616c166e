"""Operational tables (the ops zone): the batch log, its writer and its readers.

The batch log is append-only: each stage of each batch appends what it read,
landed, quarantined and dropped, so that ``read = landed + quarantined +
duplicates`` can be checked per batch and dataset at any time. Stages and
statuses are the enums of :mod:`jobs.core.batchlog`.

Typed batch state: ``kind`` (the manifest's ``full``/``incremental``),
``manifest_sha256`` (the digest of the manifest the entry was written for: a
rejected batch whose manifest changes is pending again, a landed batch
delivered again with another manifest is a conflict), ``source_file`` (the
file a rejection is about) and ``rows_not_collected`` (at ingest, the FHIR
entries of a resource type the consortium does not collect, counted on the
dataset their file is listed under; see :mod:`jobs.stages.ingest` for how a batch's
manifest rows add up) and ``rows_unchanged`` (at land, the rows landed that
changed nothing in silver: see :mod:`jobs.stages.land`).

Who reads and writes it: every stage appends through Spark (one writer style for
every Delta table of the lake, and Delta's optimistic commits between
concurrent writers). Choosing the next batch reads it with delta-rs
(:func:`jobs.stages.batch_queue.batch_log_entries`), without a Spark session: the log
is small. delta-rs cannot read a table with deletion vectors, so ops tables
never enable them (the batch log is append-only and needs none).

Older logs, written before these columns existed, are read as they are:
Delta adds the columns on the next append (``mergeSchema``), their old rows
read as null, and :func:`read_batch_log` takes the kind of an old entry from
its message (``kind=full; …``), the one place that still parses it.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType

from jobs.core.batchlog import BATCH_LOG, BATCH_LOG_COLUMNS, LEGACY_KIND_PATTERN, Stage, Status
from jobs.core.lake import Lake
from jobs.core.tables import APPEND, table_exists

BATCH_LOG_SCHEMA = StructType([
    StructField("establishment_id", StringType(), False),
    StructField("batch_id", StringType(), False),
    StructField("dataset", StringType(), True),
    StructField("stage", StringType(), False),
    StructField("status", StringType(), False),
    StructField("rows_read", LongType(), True),
    StructField("rows_landed", LongType(), True),
    StructField("rows_quarantined", LongType(), True),
    StructField("rows_duplicates", LongType(), True),
    StructField("message", StringType(), True),
    StructField("extracted_at", TimestampType(), True),
    StructField("recorded_at", TimestampType(), False),
    StructField("kind", StringType(), True),
    StructField("manifest_sha256", StringType(), True),
    StructField("source_file", StringType(), True),
    # Ingest: FHIR entries of a resource type the consortium does not collect (counted, not read).
    StructField("rows_not_collected", LongType(), True),
    # Land: rows landed that changed nothing in silver (same content, older than silver, or deleting
    # a record silver does not hold).
    StructField("rows_unchanged", LongType(), True),
])

assert tuple(BATCH_LOG_SCHEMA.fieldNames()) == BATCH_LOG_COLUMNS


def append_batch_log(spark: SparkSession, lake: Lake, entries: list[dict]) -> None:
    """Append entries (dicts with the batch log's keys) to ``ops/batch_log``."""
    if not entries:
        return
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    unknown = {k for e in entries for k in e} - set(BATCH_LOG_SCHEMA.fieldNames())
    if unknown:
        raise ValueError(f"batch log entries carry unknown keys {sorted(unknown)}")
    rows = [
        tuple(_plain(({"recorded_at": now} | e).get(f.name)) for f in BATCH_LOG_SCHEMA.fields)
        for e in entries
    ]
    df = spark.createDataFrame(rows, BATCH_LOG_SCHEMA)
    # mergeSchema: a log written before the typed columns gains them on its next append.
    df.write.format("delta").mode(APPEND).option("mergeSchema", "true").save(lake.ops(BATCH_LOG))


def _plain(value):
    """Enum members (stage, status, kind) are written as their plain value."""
    return value.value if isinstance(value, Enum) else value


def read_batch_log(spark: SparkSession, lake: Lake) -> DataFrame:
    """The batch log in :data:`BATCH_LOG_SCHEMA`, or an empty frame before the first batch."""
    if not table_exists(spark, lake.ops(BATCH_LOG)):
        return spark.createDataFrame([], BATCH_LOG_SCHEMA)
    log = spark.read.format("delta").load(lake.ops(BATCH_LOG))
    for field in BATCH_LOG_SCHEMA.fields:
        if field.name not in log.columns:
            log = log.withColumn(field.name, F.lit(None).cast(field.dataType))
    legacy_kind = F.nullif(F.regexp_extract(F.col("message"), LEGACY_KIND_PATTERN, 1), F.lit(""))
    return log.withColumn("kind", F.coalesce(F.col("kind"), legacy_kind)).select(BATCH_LOG_SCHEMA.fieldNames())


def batches_with_status(lake: Lake, establishment_id: str, stage: Stage, status: Status) -> set[str]:
    """Batch ids of one establishment that reached ``status`` at ``stage``.

    Read with delta-rs, as the queue reads it: every stage asks this before
    any work, and a few hundred log entries do not need Spark jobs.
    """
    from jobs.stages.batch_queue import batch_log_entries

    return {e["batch_id"] for e in batch_log_entries(lake, establishment_id)
            if e["stage"] == stage.value and e["status"] == status.value}
