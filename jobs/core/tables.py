"""Delta table helpers shared by every stage: key fingerprints, write metrics, and every Delta operation as SQL.

Every operation on a Delta table is a SQL statement (``CREATE TABLE``,
``MERGE INTO``, ``DELETE``, ``VACUUM``, ``OPTIMIZE``, ``DESCRIBE HISTORY``) or
a DataFrame read/write, never the ``DeltaTable`` Python API: the API reaches
Delta's JVM classes through py4j (classic session) or through Delta's Spark
Connect plugin, while SQL is planned by the Delta SQL extension of any Spark
session, in-process or the Spark service reached through Spark Connect.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql.types import (
    ByteType,
    DataType,
    DateType,
    DecimalType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    ShortType,
    StringType,
    StructType,
    TimestampNTZType,
    TimestampType,
)

from jobs.privacy.keys import KeyMismatchError

FINGERPRINT_PROPERTY = "affluent.key_fingerprint"
DELETION_VECTORS = "delta.enableDeletionVectors"
STATS_COLUMNS = "delta.dataSkippingStatsColumns"
NUM_INDEXED_COLUMNS = "delta.dataSkippingNumIndexedCols"

# Write modes, named once.
APPEND = "append"
OVERWRITE = "overwrite"


T = TypeVar("T")
K = TypeVar("K")


def stats_columns(schema: StructType, partition_by: tuple[str, ...] = ()) -> list[str]:
    """The columns Delta may keep min/max statistics of: ids, dates and numbers, never other text.

    Delta writes each file's min and max of the first 32 columns into the
    commit log, in clear, and they outlive the rows (deletes, VACUUM): a name
    typed into a coded field (care site, unit) would be published there. Ids
    are pseudonyms or record keys (``person_id``, ``patient_key``, ``…_id``);
    partition columns are in every file's path already and may not be listed.
    """
    numeric = (ByteType, ShortType, IntegerType, LongType, FloatType, DoubleType, DecimalType, DateType,
               TimestampType, TimestampNTZType)
    kept = []
    for field in schema.fields:
        if field.name in partition_by:
            continue
        is_id = isinstance(field.dataType, StringType) and (
            field.name in ("person_id", "patient_key") or field.name.endswith("_id"))
        if is_id or isinstance(field.dataType, numeric):
            kept.append(field.name)
    return kept


def add_missing_columns(spark: SparkSession, path: str, schema: StructType,
                        comment: Callable[[str], str] | None = None) -> list[str]:
    """Add to an existing table the nullable columns of ``schema`` it lacks (null in its old rows).

    A table created before a column joined the canonical schema (a condition's end date) would
    otherwise refuse every write that carries it. Only additions: a column the table has and the
    schema does not, or one of another type, is left for a migration to decide. The new columns get
    no min/max statistics (they are not in the table's statistics list), which is the safe side.
    """
    present = {f.name for f in spark.read.format("delta").load(path).schema.fields}
    missing = [f for f in schema.fields if f.name not in present]
    if missing:
        def described(name: str) -> str:
            text = comment(name) if comment is not None else ""
            return " COMMENT '" + text.replace("\\", "\\\\").replace("'", "\\'") + "'" if text else ""

        spec = ", ".join(f"`{f.name}` {f.dataType.simpleString()}{described(f.name)}" for f in missing)
        spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS ({spec})")
    return [f.name for f in missing]


def cast_to(column: Column, data_type: DataType) -> Column:
    """``column`` cast to ``data_type``, named by its SQL type name.

    Through Spark Connect a cast to a ``DataType`` object travels with an explicit collation, and
    the column's string type is then written to the Delta log as ``string collate UTF8_BINARY``,
    which other readers of the lake (delta-rs: the gateway, stewards' tools) refuse. The type's
    name is parsed by the service into the plain type.
    """
    return column.cast(data_type.simpleString())


def table_exists(spark: SparkSession, path: str) -> bool:
    """Whether ``path`` holds a Delta table; read from its log with delta-rs (no Spark job, no JVM call)."""
    from jobs.core.arrow_tables import open_delta

    return open_delta(path) is not None


def table_ref(path: str) -> str:
    """``delta.`<path>``` as SQL names a table by its location (a backtick in the path doubled)."""
    return "delta.`" + path.replace("`", "``") + "`"


def sql_string(text: str) -> str:
    """A SQL string literal of ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@contextmanager
def temp_view(frame: DataFrame) -> Iterator[str]:
    """``frame`` as a temporary view of a fresh name, dropped afterwards; the name for SQL to read it by."""
    name = "affluent_src_" + uuid.uuid4().hex
    frame.createOrReplaceTempView(name)
    try:
        yield name
    finally:
        frame.sparkSession.catalog.dropTempView(name)


def create_table(spark: SparkSession, path: str, schema: StructType, *, partition_by: Iterable[str] = (),
                 comment: str | None = None, properties: dict[str, str] | None = None,
                 column_comment: Callable[[str], str] | None = None) -> None:
    """``CREATE TABLE IF NOT EXISTS`` at ``path`` with ``schema`` (nullability and column comments kept)."""
    def column(field) -> str:
        spec = f"`{field.name}` {field.dataType.simpleString()}"
        if not field.nullable:
            spec += " NOT NULL"
        text = column_comment(field.name) if column_comment is not None else field.metadata.get("comment")
        return spec + (f" COMMENT {sql_string(text)}" if text else "")

    statement = f"CREATE TABLE IF NOT EXISTS {table_ref(path)} ({', '.join(column(f) for f in schema.fields)}) USING DELTA"
    partitions = list(partition_by)
    if partitions:
        statement += " PARTITIONED BY (" + ", ".join(f"`{c}`" for c in partitions) + ")"
    if comment:
        statement += f" COMMENT {sql_string(comment)}"
    if properties:
        statement += " TBLPROPERTIES (" + ", ".join(f"{sql_string(k)} = {sql_string(v)}"
                                                    for k, v in properties.items()) + ")"
    spark.sql(statement)


def merge_into(spark: SparkSession, path: str, source: DataFrame, condition: str, *clauses: str) -> Row | None:
    """``MERGE INTO`` the table at ``path`` (alias ``t``) from ``source`` (alias ``s``); its metrics row.

    ``clauses`` are the ``WHEN [NOT] MATCHED … THEN …`` parts, in order. The metrics
    (``num_affected_rows``, ``num_updated_rows``, ``num_deleted_rows``, ``num_inserted_rows``) are the
    MERGE's own: no history read, and no other writer's commit mistaken for it.
    """
    with temp_view(source) as view:
        return spark.sql(f"MERGE INTO {table_ref(path)} AS t USING {view} AS s ON {condition} "
                         + " ".join(clauses)).first()


def update_set(columns: Iterable[str]) -> str:
    """``c = s.c, …`` for a MERGE's ``UPDATE SET`` / ``INSERT`` of named columns."""
    return ", ".join(f"`{c}` = s.`{c}`" for c in columns)


def insert_values(columns: Iterable[str]) -> str:
    """``(c, …) VALUES (s.c, …)`` for a MERGE's ``INSERT``."""
    names = list(columns)
    return "(" + ", ".join(f"`{c}`" for c in names) + ") VALUES (" + ", ".join(f"s.`{c}`" for c in names) + ")"


def delete_where(spark: SparkSession, path: str, condition: str | None = None) -> int:
    """``DELETE FROM`` the table at ``path`` (every row when ``condition`` is ``None``); the rows deleted."""
    where = f" WHERE {condition}" if condition else ""
    row = spark.sql(f"DELETE FROM {table_ref(path)}{where}").first()
    return int((row.asDict().get("num_affected_rows") if row is not None else 0) or 0)


# Operations of one stage on different tables (a DELETE per transient table, a MERGE per silver table)
# are independent: up to this many run at once, so the Spark service overlaps their round trips and
# commits. 1 runs them one after the other.
ENV_TABLE_THREADS = "AFFLUENT_TABLE_THREADS"
DEFAULT_TABLE_THREADS = 4


def table_threads() -> int:
    """:data:`ENV_TABLE_THREADS` (default :data:`DEFAULT_TABLE_THREADS`); anything but a positive integer is refused."""
    raw = os.environ.get(ENV_TABLE_THREADS, str(DEFAULT_TABLE_THREADS)).strip()
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{ENV_TABLE_THREADS}={raw!r}: use a positive number of threads (1: one table at a time)")
    return int(raw)


def on_each_table(calls: Mapping[K, Callable[[], T]]) -> dict[K, T]:
    """Run each table's operation, up to :func:`table_threads` at once; results by name, in ``calls``' order.

    Every operation runs to its end (a commit is never abandoned half-way by a sibling's failure);
    then the first failure, in ``calls``' order, is raised.

    Example::

        removed = on_each_table({path: partial(delete_where, spark, path, "day < '2026-01-01'") for path in paths})
    """
    from concurrent.futures import ThreadPoolExecutor

    threads = min(table_threads(), len(calls))
    if threads <= 1:
        return {name: call() for name, call in calls.items()}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="table") as pool:
        futures = {name: pool.submit(_inheriting(call)) for name, call in calls.items()}
    return {name: future.result() for name, future in futures.items()}


def each_outcome(calls: Mapping[K, Callable[[], T]]) -> dict[K, T | Exception]:
    """:func:`on_each_table` for operations whose results hold something to release (a cached parse):
    every result or the exception it raised, by key in ``calls``' order, so that the caller releases the
    results of the operations that succeeded before it raises the first failure."""
    def outcome(call: Callable[[], T]) -> Callable[[], T | Exception]:
        def run() -> T | Exception:
            try:
                return call()
            except Exception as exc:  # handed to the caller, which raises it in order
                return exc
        return run

    return on_each_table({key: outcome(call) for key, call in calls.items()})


def _inheriting(call: Callable[[], T]) -> Callable[[], T]:
    """``call``, carrying this thread's Spark job properties (a benchmark's job group) into its pool thread.

    Only an in-process Spark has them; a Spark Connect client's operations carry nothing to inherit.
    """
    from pyspark import SparkContext
    from pyspark.sql.utils import is_remote

    if SparkContext._active_spark_context is None or is_remote():
        return call
    from pyspark.util import inheritable_thread_target

    return inheritable_thread_target(call)


def vacuum(spark: SparkSession, path: str, retain_hours: float) -> None:
    """``VACUUM`` the table: files out of its current version for longer than ``retain_hours`` are removed."""
    spark.sql(f"VACUUM {table_ref(path)} RETAIN {retain_hours} HOURS").collect()


def compact(spark: SparkSession, path: str) -> None:
    """``OPTIMIZE`` (bin-packing compaction of small files)."""
    spark.sql(f"OPTIMIZE {table_ref(path)}").collect()


def last_commit(path: str) -> dict:
    """The table's newest commit (``operation``, ``operationMetrics``…), read from its log with delta-rs."""
    from jobs.core.arrow_tables import open_delta

    table = open_delta(path)
    if table is None:
        raise FileNotFoundError(f"no Delta table at {path}")
    (commit,) = table.history(1)
    return commit


def table_properties(spark: SparkSession, path: str) -> dict[str, str]:
    """The table's properties, read from its metadata (``DESCRIBE DETAIL`` would also size every file)."""
    return {r.key: r.value for r in spark.sql(f"SHOW TBLPROPERTIES delta.`{path}`").collect()}


def check_fingerprint(spark: SparkSession, path: str, fingerprint: str) -> None:
    """Refuse to write pseudonyms made with another key into an existing table."""
    if not table_exists(spark, path):
        return
    props = table_properties(spark, path)
    stored = props.get(FINGERPRINT_PROPERTY)
    if stored is not None and stored != fingerprint:
        raise KeyMismatchError(
            f"{path} was written with the key whose fingerprint is {stored}; the current key's is "
            f"{fingerprint}. Pseudonyms from two keys must never be mixed: use the original key, "
            "or rebuild the lake from bronze with the new one."
        )


def purge_deletion_vectors(spark: SparkSession, path: str) -> bool:
    """Rewrite the files whose rows a deletion vector hides, so that VACUUM can remove the rows for good.

    A DELETE, UPDATE or MERGE on a table with deletion vectors only marks rows
    as gone; their bytes stay in the Parquet file. True when a purge ran.
    """
    props = table_properties(spark, path)
    if str(props.get(DELETION_VECTORS, "false")).lower() != "true":
        return False
    spark.sql(f"REORG TABLE delta.`{path}` APPLY (PURGE)")
    return True


def table_version(spark: SparkSession, path: str) -> int | None:
    """The table's current version, ``None`` when there is no table; read from its log with delta-rs (no Spark job)."""
    from jobs.core.arrow_tables import open_delta

    table = open_delta(path)
    return None if table is None else table.version()


def ensure_table(spark: SparkSession, path: str, schema, fingerprint: str | None = None,
                 partition_by: tuple[str, ...] = (), properties: dict[str, str] | None = None,
                 comment: str | None = None) -> None:
    """Create the Delta table at ``path`` if missing (with its key fingerprint); check it otherwise.

    Creating first, then writing, puts the fingerprint on the table before any
    pseudonym reaches it.
    """
    if table_exists(spark, path):
        if fingerprint is not None:
            check_fingerprint(spark, path, fingerprint)
        add_missing_columns(spark, path, schema)
        return
    # Statistics of ids, dates and numbers only (see stats_columns); none at all when there is none of them.
    props = _statistics_properties(stats_columns(schema, partition_by)) | dict(properties or {})
    if fingerprint is not None:
        props[FINGERPRINT_PROPERTY] = fingerprint
    create_table(spark, path, schema, partition_by=partition_by, comment=comment, properties=props)


def _statistics_properties(columns: list[str]) -> dict[str, str]:
    # Delta takes the listed columns' statistics; none at all when nothing may be listed.
    return {STATS_COLUMNS: ",".join(columns)} if columns else {NUM_INDEXED_COLUMNS: "0"}


def restrict_statistics(spark: SparkSession, path: str, columns: list[str]) -> None:
    """Set an existing table's statistics to ``columns`` (ids, dates, numbers), when they differ."""
    wanted = _statistics_properties(columns)
    current = table_properties(spark, path)
    if all(current.get(k) == v for k, v in wanted.items()) and (columns or STATS_COLUMNS not in current):
        return
    settings = ", ".join(f"'{k}' = '{v}'" for k, v in wanted.items())
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({settings})")
    if not columns and STATS_COLUMNS in current:
        spark.sql(f"ALTER TABLE delta.`{path}` UNSET TBLPROPERTIES ('{STATS_COLUMNS}')")


def overwrite_table(spark: SparkSession, df, path: str) -> int:
    """Replace a whole table (schema included) with ``df``, collecting statistics of ids, dates and numbers only.

    For tables rewritten whole at each run (project extracts, gold): a plain
    overwrite would collect min/max of the first 32 columns, text included,
    into the commit log. The statistics are narrowed before the write to the
    columns the table already has, and widened after it to the new schema's.
    Returns the rows the write committed (its own metrics, whatever commit follows).
    """
    kept = stats_columns(df.schema)
    if table_exists(spark, path):
        existing = {f.name for f in spark.read.format("delta").load(path).schema.fields}
        restrict_statistics(spark, path, [c for c in kept if c in existing])
    else:
        ensure_table(spark, path, df.schema)
    df.write.format("delta").mode(OVERWRITE).option("overwriteSchema", "true").save(path)
    written = last_commit(path)
    restrict_statistics(spark, path, kept)
    return int((written.get("operationMetrics") or {}).get("numOutputRows", 0))



# ------------------------------------------------- tables made once ----
#
# A stage writes the same few tables at every batch. Checking each of them with Spark before every write
# (its properties, its schema) costs a round trip to the Spark service apiece; the log holds both, and
# delta-rs reads it in the client. A table found ready is remembered for the process, with the identity
# of its first commit file: a later batch writes to it without a look while that file is the same one (a
# table dropped and made again, perhaps with another key, has a new one and is checked again).
_READY: dict[str, tuple[str | None, frozenset[str], tuple[int, int]]] = {}


def _first_commit_identity(path: str) -> tuple[int, int] | None:
    """Inode and modification time of the table's version-0 commit file; None off local disk or without it
    (object storage, or a log whose first commits were cleaned up): then the table is read every time."""
    if "://" in path and not path.startswith("file:"):
        return None
    local = path.removeprefix("file://").removeprefix("file:")
    try:
        found = os.stat(os.path.join(local, "_delta_log", "0" * 20 + ".json"))
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns


def forget_ready_tables() -> None:
    """Forget which tables were found ready (after a table is dropped or rebuilt in this process)."""
    _READY.clear()


def ready_table(spark: SparkSession, path: str, schema: StructType, fingerprint: str | None = None, *,
                partition_by: tuple[str, ...] = (), properties: dict[str, str] | None = None,
                comment: str | None = None, column_comment: Callable[[str], str] | None = None) -> None:
    """:func:`ensure_table` without a Spark round trip once the table exists, and without a look at all once
    this process has found it ready.

    An existing table is checked from its log with delta-rs: the key fingerprint property
    (:class:`KeyMismatchError` when another key wrote it) and the columns it lacks, added by
    ``ALTER TABLE`` only then. A missing one is created with ``CREATE TABLE`` (the fingerprint and
    statistics properties on it before any row reaches it).
    """
    names = frozenset(schema.fieldNames())
    known = _READY.get(path)
    if (known is not None and known[0] == fingerprint and names <= known[1]
            and known[2] == _first_commit_identity(path)):
        return
    from jobs.core.arrow_tables import open_delta

    table = open_delta(path)
    if table is None:
        props = _statistics_properties(stats_columns(schema, partition_by)) | dict(properties or {})
        if fingerprint is not None:
            props[FINGERPRINT_PROPERTY] = fingerprint
        create_table(spark, path, schema, partition_by=partition_by, comment=comment, properties=props,
                     column_comment=column_comment)
        _remember(path, fingerprint, names)
        return
    stored = (table.metadata().configuration or {}).get(FINGERPRINT_PROPERTY)
    if fingerprint is not None and stored is not None and stored != fingerprint:
        raise KeyMismatchError(
            f"{path} was written with the key whose fingerprint is {stored}; the current key's is "
            f"{fingerprint}. Pseudonyms from two keys must never be mixed: use the original key, "
            "or rebuild the lake from bronze with the new one."
        )
    present = {f.name for f in table.schema().fields}
    if names - present:
        add_missing_columns(spark, path, schema, column_comment)
    _remember(path, fingerprint, names | present)


def _remember(path: str, fingerprint: str | None, columns: frozenset[str]) -> None:
    identity = _first_commit_identity(path)
    if identity is not None:
        _READY[path] = (fingerprint, columns, identity)


def fingerprint_of(path: str) -> str | None:
    """The key fingerprint property of the table at ``path`` (``None`` without one or without a table); delta-rs."""
    from jobs.core.arrow_tables import open_delta

    table = open_delta(path)
    return None if table is None else (table.metadata().configuration or {}).get(FINGERPRINT_PROPERTY)


def require_fingerprint(path: str, fingerprint: str) -> None:
    """:func:`check_fingerprint` read from the log with delta-rs (no Spark round trip)."""
    stored = fingerprint_of(path)
    if stored is not None and stored != fingerprint:
        raise KeyMismatchError(
            f"{path} was written with the key whose fingerprint is {stored}; the current key's is "
            f"{fingerprint}. Pseudonyms from two keys must never be mixed: use the original key, "
            "or rebuild the lake from bronze with the new one."
        )


def new_commit_tag() -> str:
    """A unique ``userMetadata`` for one write, to find that write's commit among other writers'."""
    return "affluent-write-" + uuid.uuid4().hex


def written_rows(commit: dict) -> int:
    """Rows a write committed (``numOutputRows`` of its operation metrics)."""
    return int((commit.get("operationMetrics") or {}).get("numOutputRows", 0) or 0)


# ------------------------------------------------------- batch rewrites ----

def files_that_may_hold(table, match: Mapping[str, str]) -> int:
    """How many data files of a delta-rs table may hold rows whose columns equal ``match``.

    A file may hold them unless its partition values or its min/max statistics rule them out; a
    column the file has no statistics of (text columns keep none, see :func:`stats_columns`) rules
    nothing out.
    """
    import pyarrow as pa

    files = pa.table(table.get_add_actions(flatten=True))
    may_hold = [True] * files.num_rows
    for column, value in match.items():
        if f"partition.{column}" in files.column_names:
            values = files.column(f"partition.{column}").to_pylist()
            may_hold = [m and v == value for m, v in zip(may_hold, values)]
        elif f"min.{column}" in files.column_names:
            lows, highs = files.column(f"min.{column}").to_pylist(), files.column(f"max.{column}").to_pylist()
            may_hold = [m and (lo is None or hi is None or lo <= value <= hi)
                        for m, lo, hi in zip(may_hold, lows, highs)]
    return sum(may_hold)


# What :func:`replace_rows` returns when Delta made no commit (an append of no row): no row written.
NO_COMMIT: dict = {"version": None, "operationMetrics": {"numOutputRows": "0", "numFiles": "0"}}


def _commit_since(path: str, tag: str, read_version: int) -> dict:
    """The commit tagged ``tag`` among those made after ``read_version``, or :data:`NO_COMMIT`."""
    from jobs.core.arrow_tables import open_delta

    table = open_delta(path)
    newer = table.version() - read_version if table is not None else 0
    found = (c for c in (table.history(newer) if newer > 0 else []) if c.get("userMetadata") == tag)
    return next(found, NO_COMMIT)


def replace_rows(df: DataFrame, path: str, match: Mapping[str, str]) -> dict:
    """Put ``df`` in place of the rows of the existing table at ``path`` whose (text) columns equal
    ``match``: at most one commit, returned as the log records it (its ``operationMetrics`` are the
    write's own counts), :data:`NO_COMMIT` when there was nothing to write or replace.

    A ``replaceWhere`` overwrite first makes Delta rebuild the table's whole state (its delete counts
    every file of the table), about a second on a small table after each commit. A batch's first
    attempt replaces nothing, so when the log (read with delta-rs) shows no file that may hold such rows,
    ``df`` is appended instead. The log is read again at the append's version: if a file other than
    the append's own may hold such rows (another writer of the same rows committed meanwhile), the
    write is made again as a ``replaceWhere``, whose conflict check covers what the append's cannot.
    """
    from jobs.core.arrow_tables import open_delta

    table = open_delta(path)
    if table is None:
        raise FileNotFoundError(f"no Delta table at {path}")
    read_version = table.version()
    if files_that_may_hold(table, match) == 0:
        tag = new_commit_tag()
        df.write.format("delta").mode(APPEND).option("userMetadata", tag).save(path)
        commit = _commit_since(path, tag, read_version)
        if commit is NO_COMMIT:
            return commit
        table.load_as_version(commit["version"])
        if files_that_may_hold(table, match) == int(commit["operationMetrics"].get("numFiles", 0)):
            return commit
        read_version = commit["version"]
    tag = new_commit_tag()
    predicate = " AND ".join(f"`{column}` = {sql_string(value)}" for column, value in match.items())
    df.write.format("delta").mode(OVERWRITE).option("replaceWhere", predicate).option("userMetadata", tag).save(path)
    return _commit_since(path, tag, read_version)
