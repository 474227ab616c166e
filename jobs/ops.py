"""Operational tables (the ops zone): batch log and quarantine writers.

The batch log is append-only: each stage of each batch appends what it read,
landed, quarantined and dropped, so that ``read = landed + quarantined +
duplicates`` can be checked per batch and dataset at any time.
"""

from __future__ import annotations

import datetime as dt

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType

from jobs.lake import Lake
from jobs.schemas import QUARANTINE_SCHEMA

STATUS_INGESTED = "ingested"
STATUS_REJECTED = "rejected"
STATUS_PSEUDONYMISED = "pseudonymised"
STATUS_VALIDATED = "validated"
STATUS_STOPPED = "stopped"
STATUS_LANDED = "landed"

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
])

BATCH_LOG = "batch_log"


def append_batch_log(spark: SparkSession, lake: Lake, entries: list[dict]) -> None:
    """Append entries (dicts with the batch log's keys) to ``ops/batch_log``."""
    if not entries:
        return
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    rows = [
        tuple(({"recorded_at": now} | e).get(f.name) for f in BATCH_LOG_SCHEMA.fields)
        for e in entries
    ]
    df = spark.createDataFrame(rows, BATCH_LOG_SCHEMA)
    df.write.format("delta").mode("append").save(lake.ops(BATCH_LOG))


def read_batch_log(spark: SparkSession, lake: Lake) -> DataFrame:
    """The batch log, or an empty frame with its schema before the first batch."""
    if not DeltaTable.isDeltaTable(spark, lake.ops(BATCH_LOG)):
        return spark.createDataFrame([], BATCH_LOG_SCHEMA)
    return spark.read.format("delta").load(lake.ops(BATCH_LOG))


def batches_with_status(spark: SparkSession, lake: Lake, establishment_id: str, stage: str, status: str) -> set[str]:
    """Batch ids of one establishment that reached ``status`` at ``stage``."""
    rows = (
        read_batch_log(spark, lake)
        .where((F.col("establishment_id") == establishment_id) & (F.col("stage") == stage)
               & (F.col("status") == status))
        .select("batch_id").distinct().collect()
    )
    return {r.batch_id for r in rows}


def append_quarantine(df: DataFrame, lake: Lake) -> None:
    """Append rejected rows (already in :data:`QUARANTINE_SCHEMA` form, no identifier)."""
    df.select([F.col(f.name).cast(f.dataType) for f in QUARANTINE_SCHEMA.fields]).write.format(
        "delta").mode("append").save(lake.quarantine())
