"""Researcher access: checked, audited queries and exports on a project's extract.

Every call is checked before anything is read:

- the project exists, is active today (not revoked, inside its validity
  window) and the user is one of its members;
- the SQL, parsed with sqlglot, is one read-only query (SELECT, possibly with
  CTEs or set operations) and nothing else: no DDL, DML, SET, SHOW, SELECT INTO
  or command; every table it reads is one of the project's datasets, by bare
  name (``encounter``) or as ``project.encounter``; no other table, no path
  (``delta.`/x```, ``'/x.parquet'``), no table function, no time travel
  (``VERSION AS OF``: old versions may still hold withdrawn persons), and no
  function the parser does not know (``reflect``, ``getenv``…: fail closed)
  nor one that reads files.

The table names are then rewritten to the project's own tables, so what runs
is exactly what was checked. Two engines:

- ``spark``: temporary views over the project's Delta tables (current
  version), Spark SQL dialect; returns a Spark DataFrame;
- ``duckdb``: delta-rs datasets registered in an in-memory DuckDB with
  external access disabled, DuckDB dialect; returns a ``pyarrow.Table``. It
  needs no Spark session.

The audit: every query, export and refusal appends one row to
``ops/access_audit`` (an append-only Delta table, ``delta.appendOnly``)
before the result is returned: who, project, when, the SHA-256 of the SQL
(not the SQL itself, which may quote a pseudonym), engine, outcome
(``allowed``, ``refused`` or ``failed`` when an allowed query fails to run),
reason and rows returned. The audit is always written with delta-rs, so the
DuckDB path writes it without Spark and both engines share one writer.
Delta's table history is not an audit log.

Exports (CSV or Parquet) apply output checking to aggregate results: a count
column (``COUNT``, ``COUNT_IF``, approximate distinct counts, ``SUM`` of a
constant or a condition) under the project's ``min_cell_size`` becomes null,
and so do the other aggregate values of that row (a mean over three persons
is as disclosive as their count). An aggregate export without any count
column is refused, since its cells cannot be checked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from jobs import clock
from jobs.config import Consortium, Project
from jobs.lake import Lake
from jobs.policy import AccessDenied, check_access

ACCESS_AUDIT = "access_audit"
ENGINE_SPARK = "spark"
ENGINE_DUCKDB = "duckdb"
ENGINES = {ENGINE_SPARK: "spark", ENGINE_DUCKDB: "duckdb"}  # engine -> sqlglot dialect
OUTCOME_ALLOWED = "allowed"
OUTCOME_REFUSED = "refused"
OUTCOME_FAILED = "failed"
ACTION_QUERY = "query"
ACTION_EXPORT = "export"
EXPORT_FORMATS = ("csv", "parquet")
# Qualifiers a researcher may put before a dataset name.
PROJECT_QUALIFIER = "project"

AUDIT_SCHEMA = pa.schema([
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("occurred_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("user", pa.string(), nullable=False),
    pa.field("project_id", pa.string(), nullable=False),
    pa.field("action", pa.string(), nullable=False),
    pa.field("engine", pa.string(), nullable=False),
    pa.field("sql_sha256", pa.string(), nullable=False),
    pa.field("outcome", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=True),
    pa.field("rows_returned", pa.int64(), nullable=True),
    pa.field("export_format", pa.string(), nullable=True),
    pa.field("policy_version", pa.string(), nullable=False),
])

# Statement and clause types that are never part of a read-only query.
_FORBIDDEN_NODES = tuple(
    getattr(exp, name) for name in (
        "DDL", "DML", "Command", "Into", "Set", "Pragma", "Use", "Describe", "Show", "Cache", "Uncache",
        "Refresh", "LoadData", "Copy", "Transaction", "Commit", "Rollback", "Attach", "Detach", "Install",
        "Grant", "Revoke", "Analyze", "Kill", "Export", "Summarize", "Create", "Drop", "Alter", "Insert",
        "Update", "Delete", "Merge", "TruncateTable",
    ) if isinstance(getattr(exp, name, None), type)
)
_QUERY_ROOTS = (exp.Select, exp.Union, exp.Intersect, exp.Except, exp.Subquery)
# Functions that read files or call out of SQL even though the parser knows them.
_FORBIDDEN_FUNCTION_PREFIXES = ("READ", "SCAN", "GLOB", "REFLECT", "JAVA", "GETENV", "FILE", "LOAD",
                                "INPUT_FILE", "PARQUET", "DELTA", "ICEBERG", "CSV", "JSON_SCAN", "SQLITE")


class QueryRefused(AccessDenied):
    """The query breaks the access rules; the refusal is in the audit table."""


@dataclass(frozen=True)
class CheckedQuery:
    """A query that passed the checks, its tables rewritten for the engine."""

    sql: str
    datasets: tuple[str, ...]
    output_roles: tuple[str, ...] | None  # per output column: 'count', 'aggregate' or 'plain'; None with *
    aggregate: bool  # GROUP BY or an aggregate function somewhere at the top level


@dataclass(frozen=True)
class ExportOutcome:
    destination: str
    rows: int
    suppressed_cells: int


# ------------------------------------------------------------ audit ----

def _delta_uri(path: str) -> str:
    return "s3://" + path.removeprefix("s3a://") if path.startswith("s3a://") else path


def write_audit(lake: Lake, event: dict) -> None:
    """Append one event to ``ops/access_audit`` (created append-only on first use)."""
    from deltalake import DeltaTable, write_deltalake

    row = {f.name: event.get(f.name) for f in AUDIT_SCHEMA}
    row["event_id"] = row["event_id"] or str(uuid.uuid4())
    row["occurred_at"] = row["occurred_at"] or dt.datetime.now(dt.timezone.utc)
    table = pa.Table.from_pylist([row], schema=AUDIT_SCHEMA)
    uri = _delta_uri(lake.ops(ACCESS_AUDIT))
    exists = DeltaTable.is_deltatable(uri)
    write_deltalake(uri, table, mode="append",
                    configuration=None if exists else {"delta.appendOnly": "true"})


def read_audit(lake: Lake) -> pa.Table:
    """The whole audit log (for stewards), as an Arrow table."""
    from deltalake import DeltaTable

    uri = _delta_uri(lake.ops(ACCESS_AUDIT))
    if not DeltaTable.is_deltatable(uri):
        return AUDIT_SCHEMA.empty_table()
    return DeltaTable(uri).to_pyarrow_table()


# --------------------------------------------------------- checking ----

def _function_name(func: exp.Func) -> str:
    if isinstance(func, exp.Anonymous):
        return str(func.name).upper()
    return func.sql_name().upper()


def _is_count(node: exp.Expression) -> bool:
    if isinstance(node, (exp.Count, exp.CountIf, exp.ApproxDistinct)):
        return True
    if isinstance(node, exp.Sum):
        arg = node.this
        return isinstance(arg, (exp.Case, exp.If)) or not any(True for _ in arg.find_all(exp.Column))
    return False


def _roles(select: exp.Select) -> list[str] | None:
    roles = []
    for projection in select.expressions:
        if any(star.find_ancestor(exp.AggFunc) is None for star in projection.find_all(exp.Star)):
            return None  # SELECT *: output columns cannot be matched to projections
        if any(_is_count(n) for n in projection.find_all(exp.AggFunc)):
            roles.append("count")
        elif any(True for _ in projection.find_all(exp.AggFunc)):
            roles.append("aggregate")
        else:
            roles.append("plain")
    return roles


def _output_roles(query: exp.Expression) -> tuple[str, ...] | None:
    if isinstance(query, exp.Subquery):
        return _output_roles(query.this)
    if isinstance(query, exp.Select):
        roles = _roles(query)
        return tuple(roles) if roles is not None else None
    if isinstance(query, (exp.Union, exp.Intersect, exp.Except)):
        left, right = _output_roles(query.left), _output_roles(query.right)
        if left is None or right is None or len(left) != len(right):
            return None
        rank = {"plain": 0, "aggregate": 1, "count": 2}
        return tuple(max(a, b, key=rank.__getitem__) for a, b in zip(left, right))
    return None


def _is_cte_reference(table: exp.Table) -> bool:
    """Whether ``table`` names a CTE visible where it stands (else it would reach the catalog)."""
    name = table.name.lower()
    path: set[int] = set()
    node = table
    while node is not None:
        path.add(id(node))
        with_ = (node.args.get("with_") or node.args.get("with")) if isinstance(node, exp.Query) else None
        if with_ is not None:
            ctes = list(with_.expressions)
            inside = next((i for i, cte in enumerate(ctes) if id(cte) in path), None)
            # Inside a CTE's own body only the CTEs declared before it are visible.
            visible = ctes if inside is None else ctes[:inside]
            if any(cte.alias_or_name.lower() == name for cte in visible):
                return True
        node = node.parent
    return False


def check_sql(sql: str, project: Project, engine: str, view_names: dict[str, str]) -> CheckedQuery:
    """Parse and check ``sql`` for ``project``; rewrite its tables to ``view_names[dataset]``.

    Raises :class:`QueryRefused` with the reason.
    """
    dialect = ENGINES[engine]
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except SqlglotError as exc:
        raise QueryRefused(f"the SQL does not parse: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise QueryRefused(f"exactly one statement is allowed, got {len(statements)}")
    query = statements[0]
    if not isinstance(query, _QUERY_ROOTS):
        raise QueryRefused(f"only SELECT queries are allowed, not {query.key.upper()}")
    for node in query.walk():
        if isinstance(node, _FORBIDDEN_NODES):
            raise QueryRefused(f"{node.key.upper()} is not allowed in a query")
        if isinstance(node, exp.Anonymous):
            raise QueryRefused(f"function {_function_name(node)} is not allowed")
        if isinstance(node, exp.Func) and _function_name(node).startswith(_FORBIDDEN_FUNCTION_PREFIXES):
            raise QueryRefused(f"function {_function_name(node)} is not allowed")

    for with_ in query.find_all(exp.With):
        if with_.args.get("recursive"):
            raise QueryRefused("WITH RECURSIVE is not allowed")
    used: set[str] = set()
    for table in list(query.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier):
            raise QueryRefused("table functions are not allowed; read the project's datasets by name")
        if table.args.get("version") is not None or table.args.get("when") is not None:
            raise QueryRefused("time travel is not allowed; queries read the current extract only")
        name, db, catalog = table.name, table.db, table.catalog
        if catalog or (db and db.lower() not in (PROJECT_QUALIFIER, project.id)):
            raise QueryRefused(f"table {table.sql(dialect=dialect)} is not one of project {project.id}'s datasets")
        if not db and _is_cte_reference(table):
            continue
        if name not in project.datasets:
            raise QueryRefused(f"table {table.sql(dialect=dialect)} is not one of project {project.id}'s "
                               f"datasets ({', '.join(sorted(project.datasets))})")
        used.add(name)
        alias = table.args.get("alias")
        replacement = exp.to_table(view_names[name])
        replacement.set("alias", alias if alias is not None else exp.TableAlias(this=exp.to_identifier(name)))
        table.replace(replacement)
    if not used:
        raise QueryRefused("the query reads none of the project's datasets")
    roles = _output_roles(query)
    top_level_aggregate = any(isinstance(n, (exp.AggFunc, exp.Group)) for n in _top_level_nodes(query))
    return CheckedQuery(sql=query.sql(dialect=dialect), datasets=tuple(sorted(used)), output_roles=roles,
                        aggregate=top_level_aggregate or (roles is not None and any(r != "plain" for r in roles)))


def _top_level_nodes(query: exp.Expression):
    """Nodes of the outermost SELECT(s), not of subqueries or CTEs."""
    for node in query.walk(prune=lambda n: n is not query and isinstance(n, (exp.Subquery, exp.CTE))):
        yield node


# ---------------------------------------------------------- engines ----

def _run_spark(spark, lake: Lake, project: Project, sql: str, engine: str):
    token = uuid.uuid4().hex[:12]
    views = {d: f"_q{token}_{d}" for d in project.datasets}
    checked = check_sql(sql, project, engine, views)
    for dataset in checked.datasets:
        _require_extract(lake, project, dataset)
        spark.read.format("delta").load(lake.project(project.id, dataset)).createOrReplaceTempView(views[dataset])
    try:
        result = spark.sql(checked.sql)
    finally:
        for dataset in checked.datasets:
            spark.catalog.dropTempView(views[dataset])
    return checked, result


def _run_duckdb(lake: Lake, project: Project, sql: str, engine: str) -> tuple[CheckedQuery, pa.Table]:
    import duckdb
    from deltalake import DeltaTable

    views = {d: f"q_{d}" for d in project.datasets}
    checked = check_sql(sql, project, engine, views)
    con = duckdb.connect(config={"enable_external_access": False, "lock_configuration": True})
    try:
        for dataset in checked.datasets:
            _require_extract(lake, project, dataset)
            con.register(views[dataset], DeltaTable(_delta_uri(lake.project(project.id, dataset))).to_pyarrow_dataset())
        return checked, con.sql(checked.sql).to_arrow_table()
    finally:
        con.close()


def _require_extract(lake: Lake, project: Project, dataset: str) -> None:
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(_delta_uri(lake.project(project.id, dataset))):
        raise QueryRefused(f"the {dataset} extract of project {project.id} is not published yet")


def _execute(spark_or_none, lake: Lake, consortium: Consortium, project_id: str, user: str, sql: str,
             engine: str, action: str, today: dt.date | None, export_format: str | None = None):
    """Check, run and audit; return (project, checked query, result, audit event)."""
    event = {"user": user, "project_id": project_id, "action": action, "engine": engine,
             "sql_sha256": hashlib.sha256(sql.encode("utf-8")).hexdigest(),
             "policy_version": consortium.policy_version, "export_format": export_format}
    try:
        if engine not in ENGINES:
            raise QueryRefused(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
        if engine == ENGINE_SPARK and spark_or_none is None:
            raise QueryRefused("the spark engine needs a SparkSession; use engine='duckdb' without one")
        project = check_access(consortium, project_id, user, today or clock.today())
        if engine == ENGINE_SPARK:
            checked, result = _run_spark(spark_or_none, lake, project, sql, engine)
        else:
            checked, result = _run_duckdb(lake, project, sql, engine)
    except AccessDenied as exc:
        write_audit(lake, event | {"outcome": OUTCOME_REFUSED, "reason": str(exc)})
        raise
    except Exception as exc:
        write_audit(lake, event | {"outcome": OUTCOME_FAILED, "reason": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    return project, checked, result, event


def query(spark_or_none, lake: Lake, consortium: Consortium, project_id: str, user: str, sql: str,
          engine: str = ENGINE_SPARK, today: dt.date | None = None):
    """Run a researcher's query on one project's extract; audited, allowed or refused.

    Returns a Spark DataFrame (``engine='spark'``) or a ``pyarrow.Table``
    (``engine='duckdb'``); raises :class:`jobs.policy.AccessDenied` (or its
    subclass :class:`QueryRefused`) when refused.

    Example::

        table = query(None, lake, consortium, "diabetes_outcomes", "alice.tremblay",
                      "SELECT visit_source_value, count(*) AS n FROM encounter GROUP BY 1",
                      engine="duckdb")
    """
    _, _, result, event = _execute(spark_or_none, lake, consortium, project_id, user, sql, engine,
                                   ACTION_QUERY, today)
    try:
        rows = result.num_rows if isinstance(result, pa.Table) else result.count()
    except Exception as exc:
        write_audit(lake, event | {"outcome": OUTCOME_FAILED, "reason": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    write_audit(lake, event | {"outcome": OUTCOME_ALLOWED, "rows_returned": rows})
    return result


# ----------------------------------------------------------- export ----

def _suppress_arrow(table: pa.Table, roles: tuple[str, ...], min_cell: int) -> tuple[pa.Table, int]:
    import pyarrow.compute as pc

    names = table.column_names
    counts = [names[i] for i, r in enumerate(roles) if r == "count"]
    aggregates = [names[i] for i, r in enumerate(roles) if r in ("count", "aggregate")]
    small = pa.array([False] * table.num_rows, pa.bool_())
    for name in counts:
        small = pc.or_(small, pc.fill_null(pc.less(table[name], min_cell), False))
    for name in aggregates:
        column = table[name]
        table = table.set_column(names.index(name), name,
                                 pc.if_else(small, pa.scalar(None, column.type), column))
    return table, int(pc.sum(small.cast(pa.int64())).as_py() or 0)


def _suppress_spark(df, roles: tuple[str, ...], min_cell: int):
    from pyspark.sql import functions as F

    names = df.columns
    counts = [names[i] for i, r in enumerate(roles) if r == "count"]
    aggregates = {names[i] for i, r in enumerate(roles) if r in ("count", "aggregate")}
    small = F.lit(False)
    for name in counts:
        small = small | F.coalesce(F.col(name) < F.lit(min_cell), F.lit(False))
    out = df.withColumn("_small", small).select(
        *[F.when(~F.col("_small"), F.col(f"`{n}`")).alias(n) if n in aggregates else F.col(f"`{n}`")
          for n in names], "_small").localCheckpoint()
    suppressed = out.where("_small").count()
    return out.drop("_small"), suppressed


def export(spark_or_none, lake: Lake, consortium: Consortium, project_id: str, user: str, sql: str,
           destination: str, fmt: str = "csv", engine: str = ENGINE_DUCKDB,
           today: dt.date | None = None) -> ExportOutcome:
    """Write a query's result as CSV or Parquet, small cells suppressed; audited.

    With DuckDB ``destination`` is a file; with Spark, a folder of part files.
    """
    if fmt not in EXPORT_FORMATS:
        write_audit(lake, {"user": user, "project_id": project_id, "action": ACTION_EXPORT, "engine": engine,
                           "sql_sha256": hashlib.sha256(sql.encode("utf-8")).hexdigest(),
                           "policy_version": consortium.policy_version, "export_format": fmt,
                           "outcome": OUTCOME_REFUSED, "reason": f"unknown export format {fmt!r}"})
        raise QueryRefused(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    project, checked, result, event = _execute(spark_or_none, lake, consortium, project_id, user, sql, engine,
                                               ACTION_EXPORT, today, export_format=fmt)
    roles = checked.output_roles
    aggregate = checked.aggregate
    try:
        if aggregate and roles is None:
            raise QueryRefused("an aggregate export may not use *; name its columns so cells can be checked")
        if aggregate and "count" not in roles:
            raise QueryRefused("an aggregate export needs a COUNT column so that small cells can be suppressed")
        ncols = result.num_columns if isinstance(result, pa.Table) else len(result.columns)
        if aggregate and len(roles) != ncols:
            raise QueryRefused("the export's columns could not be matched to the query; name every column")
    except QueryRefused as exc:
        write_audit(lake, event | {"outcome": OUTCOME_REFUSED, "reason": str(exc)})
        raise
    try:
        suppressed = 0
        if isinstance(result, pa.Table):
            if aggregate:
                result, suppressed = _suppress_arrow(result, roles, project.min_cell_size)
            Path(destination).parent.mkdir(parents=True, exist_ok=True)
            if fmt == "csv":
                import pyarrow.csv as pacsv
                pacsv.write_csv(result, destination)
            else:
                import pyarrow.parquet as pq
                pq.write_table(result, destination)
            rows = result.num_rows
        else:
            if aggregate:
                result, suppressed = _suppress_spark(result, roles, project.min_cell_size)
            writer = result.coalesce(1).write.mode("errorifexists")
            (writer.option("header", "true").csv(destination) if fmt == "csv" else writer.parquet(destination))
            rows = result.count()
    except Exception as exc:
        write_audit(lake, event | {"outcome": OUTCOME_FAILED, "reason": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    write_audit(lake, event | {"outcome": OUTCOME_ALLOWED, "rows_returned": rows,
                               "reason": f"{suppressed} row(s) with small cells suppressed" if suppressed else None})
    return ExportOutcome(destination=destination, rows=rows, suppressed_cells=suppressed)

