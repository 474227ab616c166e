"""Maintenance jobs: retention purges, compaction and VACUUM, and the helpers erasure shares.

Deleted rows live on in old Parquet files until VACUUM, and time travel returns
them until then; old commits keep statistics (min/max values) of the files
they added. A purge is complete only after the files are removed and the
history that describes them is forgotten (:func:`forget_history`).

Purges iterate over :data:`jobs.core.lake.ZONES`, so that no zone is forgotten:
every zone holding direct identifiers is purged after its retention, every
transient zone (staged, validated) once its batch has landed or been skipped,
or ``transient_retention_days`` after a stopped batch's last batch-log entry.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.core import files
from jobs.core.lake import BRONZE, DIRECT_IDENTIFIERS, LANDING, PROJECTS, ZONES, Lake
from jobs.core.schemas import DATASETS
from jobs.core.tables import compact, delete_where, merge_into, purge_deletion_vectors, table_exists, table_version
from jobs.core.tables import on_each_table, vacuum
from jobs.core.writer_lock import Mode, writes_lake

RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
CHECKPOINT_INTERVAL = "delta.checkpointInterval"
_LOG_VERSION = re.compile(r"^\.?(\d{20})\.")


@contextmanager
def retention_check_disabled(spark: SparkSession):
    """Allow VACUUM RETAIN 0 HOURS for the duration of one purge, then restore the guard."""
    previous = spark.conf.get(RETENTION_CHECK, "true") or "true"
    spark.conf.set(RETENTION_CHECK, "false")
    try:
        yield
    finally:
        spark.conf.set(RETENTION_CHECK, previous)


def vacuum_now(spark: SparkSession, path: str) -> None:
    """Remove every file no longer in the table's current version."""
    with retention_check_disabled(spark):
        vacuum(spark, path, 0)


def remove_for_good(spark: SparkSession, tables: Mapping[str, str]) -> None:
    """Purge each table's deletion vectors, VACUUM it with no retention and forget its history; several at once.

    Retention's guard is lifted once for all of them: a guard lifted and restored around each VACUUM
    would be restored by one table's thread while another's VACUUM runs.
    """
    def remove(path: str) -> None:
        purge_deletion_vectors(spark, path)
        vacuum(spark, path, 0)
        forget_history(spark, path)

    with retention_check_disabled(spark):
        on_each_table({name: functools.partial(remove, path) for name, path in tables.items()})


def keys_frame(spark: SparkSession, schema: str, rows: list[tuple]) -> DataFrame:
    """A small table of keys built as data: an RDD, so no plan nor log prints the rows.

    A Spark Connect client has no RDD: there the rows travel in the request as a local relation,
    which the service's plans print; they are pseudonyms and record keys, never the key.
    """
    from jobs.core.session import is_connect

    if is_connect(spark):
        return spark.createDataFrame(rows, schema)
    return spark.createDataFrame(spark.sparkContext.parallelize(rows, 1), schema)


def delete_matching(spark: SparkSession, path: str, keys: DataFrame, columns: list[str]) -> int:
    """Delete the rows whose ``columns`` match a row of ``keys``; the number of rows removed.

    A MERGE, not a DELETE: the commit log then records ``t.c = s.c``, never the ids. A table
    holding none of the keys is left alone (no MERGE, no commit): a semi-join finds that in a
    fraction of a MERGE's jobs, and an erasure walks every table of the lake.
    """
    if spark.read.format("delta").load(path).join(keys, on=columns, how="left_semi").isEmpty():
        return 0
    condition = " AND ".join(f"t.`{c}` = s.`{c}`" for c in columns)
    # The MERGE returns its own metrics: no history read, and no other writer's commit mistaken for it.
    metrics = merge_into(spark, path, keys, condition, "WHEN MATCHED THEN DELETE")
    return int((metrics.num_deleted_rows if metrics is not None else 0) or 0)


def list_folders(spark: SparkSession, path: str) -> list[str]:
    """Names of the folders directly in ``path`` (read from Python: a Spark Connect client has no JVM)."""
    return files.list_folders(path)


def forget_history(spark: SparkSession, path: str) -> int:
    """Make the current version the oldest one the table knows; the number of log files deleted.

    Old commits keep statistics (min/max of ``person_id``, of names in
    bronze) of files that held an erased person, and let time travel reach
    them. A checkpoint of the current version stands in for them, then every
    older commit, checksum and checkpoint is deleted.
    """
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('{CHECKPOINT_INTERVAL}' = '1')")
    kept = table_version(spark, path)  # this commit is checkpointed (interval 1)
    if kept is None:
        raise FileNotFoundError(f"no Delta table at {path}: its history cannot be forgotten")
    spark.sql(f"ALTER TABLE delta.`{path}` UNSET TBLPROPERTIES ('{CHECKPOINT_INTERVAL}')")
    log = f"{path.rstrip('/')}/_delta_log"
    deleted = 0
    for file in files.list_files(log):
        version = _LOG_VERSION.match(file.rsplit("/", 1)[-1])
        if version and int(version.group(1)) < kept:
            files.delete_file(log, file)
            deleted += 1
    return deleted


def table_files(spark: SparkSession, path: str) -> tuple[list[str], list[str]]:
    """Every Parquet data file under a table's folder (in its current version or not) and every file of its log.

    Files on disk, not the table's file list: an orphan file, or one only an
    old version names, holds rows all the same, and so do the files in partition
    folders (``_batch_id=…``) and in ``_change_data/`` (the change data feed's copies
    of changed rows). Hadoop's hidden ``.<name>.crc`` sidecars only checksum the
    files listed here, and deletion vectors hold row numbers only.
    """
    data, log = [], []
    _, root = files.filesystem(path)
    prefix = root.rstrip("/") + "/"
    for file in files.list_files(path, recursive=True):
        relative = file.removeprefix(prefix)
        name = relative.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        if relative.startswith("_delta_log/"):
            log.append(files.spark_path(path, file))
        elif name.endswith(".parquet"):
            data.append(files.spark_path(path, file))
    return sorted(data), sorted(log)


@dataclass(frozen=True)
class TableContents:
    """A table's files as text, one row per data row (decoded Parquet, as JSON) or log line, and how many files."""

    values: DataFrame | None  # columns ``table``, ``value``
    data_files: int
    log_files: int


def table_contents(spark: SparkSession, name: str, path: str) -> TableContents:
    """Every data row of every data file, and every line or row of every commit, checksum and checkpoint, as text.

    Min/max statistics are not a content scan: an id between a file's min and
    max is invisible to them. Values here are whole rows, decoded.
    """
    data, log = table_files(spark, path)
    frames = []
    as_text = F.to_json(F.struct("*"))
    if data:
        # mergeSchema: files written before a column was added still decode, with nulls for it.
        frames.append(spark.read.option("mergeSchema", "true").parquet(*data).select(as_text.alias("value")))
    log_parquet = [f for f in log if f.endswith(".parquet")]
    log_text = [f for f in log if not f.endswith(".parquet")]
    if log_text:
        frames.append(spark.read.text(log_text).select("value"))
    if log_parquet:
        frames.append(spark.read.option("mergeSchema", "true").parquet(*log_parquet).select(as_text.alias("value")))
    values = None
    for frame in frames:
        frame = frame.select(F.lit(name).alias("table"), "value")
        values = frame if values is None else values.unionByName(frame)
    return TableContents(values, len(data), len(log))


def mentions(contents: DataFrame, ids: DataFrame) -> dict[tuple[str, str], int]:
    """Rows of ``contents`` (``table``, ``value``) holding one of ``ids`` (``id``, ``kind``), by table and kind.

    A substring search, so that an id inside a JSON document, a predicate or
    a statistic is found too; ``ids`` is small and broadcast.
    """
    found = (contents.join(F.broadcast(ids), F.instr(F.col("value"), F.col("id")) > 0, how="inner")
             .groupBy("table", "kind").count().collect())
    return {(r.table, r.kind): int(r["count"]) for r in found}


def zone_tables(spark: SparkSession, lake: Lake, zone: str) -> dict[str, str]:
    """Every Delta table of a zone, by ``zone.table`` (``projects.<project>.<table>`` for extracts)."""
    tables = {}
    for folder in list_folders(spark, lake.zone(zone)):
        path = f"{lake.zone(zone)}/{folder}"
        if table_exists(spark, path):
            tables[f"{zone}.{folder}"] = path
        elif zone == PROJECTS:
            tables |= {f"{zone}.{folder}.{name}": p for name, p in
                       ((n, f"{path}/{n}") for n in list_folders(spark, path)) if table_exists(spark, p)}
    return tables


@writes_lake(Mode.EXCLUSIVE)
def purge_bronze(spark: SparkSession, lake: Lake, retention_days: int, now: dt.datetime | None = None) -> dict:
    """Delete batches ingested more than ``retention_days`` ago from every zone of direct identifiers, physically.

    Landing is files as delivered, not tables: its retention is the landing
    folder's. The history of each purged table is forgotten, since old
    commits keep statistics (names, references) of the files they added.
    """
    now = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    cutoff = now - dt.timedelta(days=retention_days)
    tables = {name: path for zone in ZONES.values() if DIRECT_IDENTIFIERS in zone.holds and zone.name != LANDING
              for name, path in zone_tables(spark, lake, zone.name).items()}
    # The session's time zone is UTC (jobs.core.session), as the cutoff is.
    older = f"_ingested_at < TIMESTAMP '{cutoff.isoformat(sep=' ')}'"
    deleted = on_each_table({name: functools.partial(delete_where, spark, path, older) for name, path in tables.items()})
    remove_for_good(spark, {name: tables[name] for name, n in deleted.items() if n})
    removed = {name.split(".", 1)[1] if name.startswith(f"{BRONZE}.") else name: n for name, n in deleted.items()}
    return {"cutoff": cutoff.isoformat(), "rows_removed": removed}


@writes_lake(Mode.SHARED)
def purge_transient(spark: SparkSession, lake: Lake, establishment_id: str, batch_id: str) -> dict[str, int]:
    """Remove one batch from every transient zone (staged, validated) once it has landed; rows removed per table.

    A DELETE on the establishment and batch: the commit records that predicate, as the
    stages' rewrites of their batch (``replaceWhere``) do. Neither names a person
    (persons are only ever matched as data, :func:`delete_matching`).
    """
    removed: dict[str, int] = {}
    deletes = {}
    for zone in ZONES.values():
        if not zone.transient:
            continue
        for name, path in zone_tables(spark, lake, zone.name).items():
            # A table whose files cannot hold the batch (their statistics say so) needs no DELETE: each one
            # is a Spark job, and a batch rarely carries every dataset.
            removed[name] = 0
            if may_hold_batch(path, establishment_id, batch_id):
                deletes[name] = functools.partial(delete_batch, spark, path, establishment_id, batch_id)
    # One table's DELETE does not wait on another's: they run side by side (jobs.core.tables.on_each_table).
    return removed | on_each_table(deletes)


def may_hold_batch(path: str, establishment_id: str, batch_id: str) -> bool:
    """Whether a transient table may hold rows of the batch, from its files' partition values and min/max
    statistics (``establishment_id``, ``_batch_id``), read from the log with delta-rs (no Spark job).

    A file the log cannot rule out (no statistics, a value in its range) counts as holding the batch:
    only a certain absence skips the DELETE.
    """
    import pyarrow as pa

    from jobs.core.arrow_tables import open_delta

    table = open_delta(path)
    if table is None:
        return False
    actions = pa.table(table.get_add_actions(flatten=True)).to_pydict()
    files = len(actions.get("path") or [])

    def column(name: str) -> list:
        return actions.get(name) or [None] * files

    def within(value: str, low, high) -> bool:
        return low is None or high is None or low <= value <= high

    # A partition column has a value per file (tables laid out by jobs.core.lake.TRANSIENT_PARTITIONS, or by
    # establishment only when made before that layout); any other column has min/max statistics at best.
    establishments, batches = actions.get("partition.establishment_id"), actions.get("partition._batch_id")
    for i, (low_e, high_e, low_b, high_b) in enumerate(zip(
            column("min.establishment_id"), column("max.establishment_id"),
            column("min._batch_id"), column("max._batch_id"))):
        establishment_ok = (establishments[i] == establishment_id if establishments is not None
                            else within(establishment_id, low_e, high_e))
        batch_ok = batches[i] == batch_id if batches is not None else within(batch_id, low_b, high_b)
        if establishment_ok and batch_ok:
            return True
    return False


def delete_batch(spark: SparkSession, path: str, establishment_id: str, batch_id: str) -> int:
    """Delete one batch's rows from a transient table; the number of rows removed (the DELETE's own result)."""
    deleted = spark.sql(f"DELETE FROM delta.`{path}` WHERE establishment_id = {_sql_text(establishment_id)} "
                        f"AND _batch_id = {_sql_text(batch_id)}").first()
    return int(deleted.num_affected_rows or 0) if deleted is not None else 0


def _sql_text(value: str) -> str:
    """A SQL string literal; establishment and batch ids are checked names, escaped all the same."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@writes_lake(Mode.EXCLUSIVE)
def purge_transient_zones(spark: SparkSession, lake: Lake, retention_days: int,
                          now: dt.datetime | None = None) -> dict:
    """staged/ and validated/ keep a batch only while it may still land; physically, files and history.

    A batch landed or skipped leaves them (land and skip remove it themselves;
    this catches one interrupted in between). A batch stopped, rejected or left
    in progress with no batch-log entry for ``retention_days`` leaves them too:
    a retry re-runs it from bronze. Rows deleted earlier (by land, skip or
    erasure) and still in files hidden by deletion vectors go with them.
    """
    from jobs.core.batchlog import Stage, Status
    from jobs.core.ops import read_batch_log

    now = now or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    cutoff = now - dt.timedelta(days=retention_days)
    steward = F.col("stage") == Stage.STEWARD.value
    per_batch = read_batch_log(spark, lake).groupBy("establishment_id", "batch_id").agg(
        F.max("recorded_at").alias("last"),
        F.max((F.col("stage") == Stage.LAND.value) & (F.col("status") == Status.LANDED.value)).alias("has_landed"),
        # The latest steward decision (a retry after a skip takes the batch back).
        F.max_by(F.when(steward, F.col("status")), F.when(steward, F.col("recorded_at"))).alias("decision"))
    done = F.col("has_landed") | F.coalesce(F.col("decision") == Status.SKIPPED.value, F.lit(False))
    stale = ~done & (F.col("last") < F.lit(cutoff))
    # The batches to purge stay a Spark frame (the log grows with every landed batch); only stale ones are listed.
    keys = (per_batch.where(done | stale)
            .select("establishment_id", F.col("batch_id").alias("_batch_id")).persist())
    stale_batches = [f"{r.establishment_id}/{r.batch_id}" for r in
                     per_batch.where(stale).select("establishment_id", "batch_id")
                     .orderBy("establishment_id", "batch_id").collect()]
    anything = not keys.isEmpty()
    try:
        tables = {name: path for zone in ZONES.values() if zone.transient
                  for name, path in zone_tables(spark, lake, zone.name).items()}
        deleted = on_each_table({name: functools.partial(delete_matching, spark, path, keys,
                                                         ["establishment_id", "_batch_id"])
                                 for name, path in tables.items()}) if anything else {}
        removed = {name: deleted.get(name, 0) for name in tables}
        # Rows hidden by deletion vectors (this purge's or an earlier one's) leave the files, then
        # the files and the history leave the table: under the exclusive lock no write is in flight.
        remove_for_good(spark, tables)
    finally:
        keys.unpersist()
    return {"cutoff": cutoff.isoformat(), "stale_batches": stale_batches, "rows_removed": removed}


@writes_lake(Mode.EXCLUSIVE)
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
        compact(spark, path)
        purge_deletion_vectors(spark, path)
        vacuum(spark, path, retain_hours)
        done.append(path.rsplit("/", 2)[-2] + "." + path.rsplit("/", 1)[-1])
    return {"compacted": done}
