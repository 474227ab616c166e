"""Maintenance jobs: bronze retention purge, compaction and VACUUM.

Deleted rows live on in old Parquet files until VACUUM, and time travel returns
them until then: a purge is complete only after the files are removed.
"""

from __future__ import annotations

import datetime as dt
from contextlib import contextmanager

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.lake import Lake
from jobs.schemas import DATASETS
from jobs.tables import purge_deletion_vectors, table_exists

RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"


@contextmanager
def retention_check_disabled(spark: SparkSession):
    """Allow VACUUM RETAIN 0 HOURS for the duration of one purge, then restore the guard."""
    previous = spark.conf.get(RETENTION_CHECK, "true")
    spark.conf.set(RETENTION_CHECK, "false")
    try:
        yield
    finally:
        spark.conf.set(RETENTION_CHECK, previous)


def vacuum_now(spark: SparkSession, path: str) -> None:
    """Remove every file no longer in the table's current version."""
    with retention_check_disabled(spark):
        DeltaTable.forPath(spark, path).vacuum(0)


def purge_bronze(spark: SparkSession, lake: Lake, retention_days: int, now: dt.datetime | None = None) -> dict:
    """Delete bronze batches ingested more than ``retention_days`` ago, physically."""
    now = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    cutoff = now - dt.timedelta(days=retention_days)
    removed: dict[str, int] = {}
    for dataset in DATASETS:
        path = lake.bronze(dataset)
        if not table_exists(spark, path):
            continue
        table = DeltaTable.forPath(spark, path)
        table.delete(F.col("_ingested_at") < F.lit(cutoff))
        metrics = table.history(1).select("operation", "operationMetrics").first()
        removed[dataset] = int((metrics.operationMetrics or {}).get("numDeletedRows", 0)) \
            if metrics.operation == "DELETE" else 0
        vacuum_now(spark, path)
    return {"cutoff": cutoff.isoformat(), "rows_removed": removed}


def compact_and_vacuum(spark: SparkSession, lake: Lake, retain_hours: int = 168) -> dict:
    """OPTIMIZE silver and ops tables, purge rows hidden by deletion vectors, then VACUUM (default 7 days).

    Records an establishment deleted, and the old versions of updated ones,
    leave silver's files here and its history once ``retain_hours`` have passed.
    """
    done = []
    paths = [lake.silver(d) for d in DATASETS] + [lake.ops(t) for t in ("batch_log", "validation_results")]
    for path in paths:
        if not table_exists(spark, path):
            continue
        table = DeltaTable.forPath(spark, path)
        table.optimize().executeCompaction()
        purge_deletion_vectors(spark, path)
        table.vacuum(retain_hours)
        done.append(path.rsplit("/", 2)[-2] + "." + path.rsplit("/", 1)[-1])
    return {"compacted": done}
