"""Researcher access: checked, limited, output-checked and audited SQL on a project's extract.

This is the engine of the researcher gateway (:mod:`jobs.research.gateway`): researchers
never call it in their own process; ``affluent query/export`` are HTTP clients
of the gateway. Researcher SQL never runs in Spark (``${env:…}`` substitution
and ``TRANSFORM … USING`` script transforms escape any parser-level check
there); it runs in DuckDB over delta-rs Arrow datasets, in a gateway process
that holds no key and can read only ``projects/`` and ``gold/``.

Layers, in order, for every query:

1. size: SQL longer than ``Limits.max_sql_bytes`` is refused before parsing;
2. :func:`check_sql` (sqlglot, DuckDB dialect): one read-only query (SELECT,
   possibly with CTEs or set operations) and nothing else: no DDL, DML, SET,
   PRAGMA, COPY, ATTACH, INSTALL/LOAD, SELECT INTO or command; every table it
   reads is one of the project's datasets, by bare name (``encounter``) or as
   ``project.encounter`` / ``<project id>.encounter``; no other table, no path
   (``'/x.parquet'``), no table function, no time travel, no catalog, and no
   function the parser does not know (``reflect``, ``getenv``,
   ``current_setting``…: fail closed) nor one that reads files. Table names
   are then rewritten to the registered views, so what runs is what was checked;
3. DuckDB locked down: only the project's published datasets are registered,
   ``enable_external_access=false``, extension auto-install/-load off, then a
   per-query ``memory_limit`` and ``threads``, then ``lock_configuration``; a
   timer interrupts a query past ``Limits.timeout_seconds``; a result over
   ``Limits.max_rows`` rows is refused;
4. output checking (:func:`jobs.privacy.disclosure.check_output`) on every result;
   CSV exports also get :func:`jobs.privacy.disclosure.neutralise_csv`.

That is the path of row-level projects. An aggregate-only project's SQL
never runs in DuckDB: :func:`private_answer` translates it into an OpenDP
plan (:mod:`jobs.privacy.private_aggregates`, refused before any data is read when
it is outside that language), spends its (ε, δ) from the member's budget
(:mod:`jobs.privacy.privacy_budget`) and releases differentially private statistics.

The audit (:mod:`jobs.research.gateway.audit`) is written by the caller before the
result leaves; :func:`query` and :func:`export` here do it for in-process
callers (the gateway, the demo, benchmarks).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import threading
from dataclasses import dataclass, field

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from jobs.core import clock
from jobs.core.config import Consortium, Project
from jobs.core.arrow_tables import delta_uri
from jobs.research.gateway.audit import ACCESS_AUDIT, AUDIT_SCHEMA, read_audit, write_audit  # noqa: F401
from jobs.core.lake import Lake
from jobs.privacy.policy import AccessDenied, check_access

ENGINE_DUCKDB = "duckdb"
ENGINES = {ENGINE_DUCKDB: "duckdb"}  # engine -> sqlglot dialect
OUTCOME_ALLOWED = "allowed"
OUTCOME_REFUSED = "refused"
OUTCOME_FAILED = "failed"
# Written once a query passed its checks, before it reads data: a killed query leaves this row.
OUTCOME_REQUESTED = "requested"
ACTION_QUERY = "query"
ACTION_EXPORT = "export"
EXPORT_FORMATS = ("csv", "parquet")
# Qualifiers a researcher may put before a dataset name.
PROJECT_QUALIFIER = "project"
# Audit rows keep at most this much SQL text (refused oversized SQL is cut, its SHA-256 kept whole).
AUDIT_SQL_CHARS = 20_000


@dataclass(frozen=True)
class Limits:
    """Per-query limits of the gateway."""

    max_sql_bytes: int = 20_000
    max_rows: int = 100_000
    memory_limit: str = "512MB"
    threads: int = 2
    timeout_seconds: float = 30.0
    # DuckDB spills to the gateway's private temp folder; past this it fails the query instead.
    max_temp_size: str = "1GB"


DEFAULT_LIMITS = Limits()

# Statement and clause types that are never part of a read-only query.
_FORBIDDEN_NODES = tuple(
    getattr(exp, name) for name in (
        "DDL", "DML", "Command", "Into", "Set", "Pragma", "Use", "Describe", "Show", "Cache", "Uncache",
        "Refresh", "LoadData", "Copy", "Transaction", "Commit", "Rollback", "Attach", "Detach", "Install",
        "Grant", "Revoke", "Analyze", "Kill", "Export", "Summarize", "Create", "Drop", "Alter", "Insert",
        "Update", "Delete", "Merge", "TruncateTable", "Parameter", "Placeholder", "SessionParameter",
        "QueryTransform",
    ) if isinstance(getattr(exp, name, None), type)
)
_QUERY_ROOTS = (exp.Select, exp.Union, exp.Intersect, exp.Except, exp.Subquery)
# Functions that read files, settings or the catalog, or call out of SQL, even though the parser knows them.
_FORBIDDEN_FUNCTION_PREFIXES = ("READ", "SCAN", "GLOB", "REFLECT", "JAVA", "GETENV", "FILE", "LOAD",
                                "INPUT_FILE", "PARQUET", "DELTA", "ICEBERG", "CSV", "JSON_SCAN", "SQLITE",
                                "CURRENT_SETTING", "GETVARIABLE", "DUCKDB_", "PG_", "PRAGMA", "QUERY",
                                "SETTING", "ENV", "WHICH_SECRET", "SYSTEM", "SHELL", "EXEC", "HTTP",
                                "CURRENT_SCHEMA", "CURRENT_DATABASE", "CURRENT_CATALOG", "VERSION", "SESSION")


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
class Answer:
    """A result that passed output checking, ready to leave once audited."""

    table: pa.Table
    checked: CheckedQuery
    suppressed_cells: int
    notes: list[str] = field(default_factory=list)
    # Differentially private answers (aggregate-only projects): the loss spent and the budget left.
    epsilon: float | None = None
    delta: float | None = None
    budget_left: dict | None = None


@dataclass(frozen=True)
class ExportOutcome:
    destination: str
    rows: int
    suppressed_cells: int


def check_size(sql: str, limits: Limits = DEFAULT_LIMITS) -> None:
    size = len(sql.encode("utf-8"))
    if size > limits.max_sql_bytes:
        raise QueryRefused(f"the SQL is {size} bytes; at most {limits.max_sql_bytes} are accepted")


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


def _output_roles(query: exp.Expr) -> tuple[str, ...] | None:
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
    node: exp.Expr | None = table
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


def check_sql(sql: str, project: Project, engine: str = ENGINE_DUCKDB,
              view_names: dict[str, str] | None = None) -> CheckedQuery:
    """Parse and check ``sql`` for ``project``; rewrite its tables to ``view_names[dataset]``.

    Raises :class:`QueryRefused` with the reason.
    """
    if engine not in ENGINES:
        raise QueryRefused(f"unknown engine {engine!r}: researcher SQL runs in DuckDB only, never in Spark")
    dialect = ENGINES[engine]
    view_names = view_names or {d: d for d in project.datasets}
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


# ---------------------------------------------------------- running ----

def _published(lake: Lake, project: Project) -> dict[str, str]:
    """Dataset -> Delta URI of the project's published extracts."""
    from deltalake import DeltaTable

    uris = {d: delta_uri(lake.project(project.id, d)) for d in project.datasets}
    return {d: uri for d, uri in uris.items() if DeltaTable.is_deltatable(uri)}


def locked_connection(limits: Limits = DEFAULT_LIMITS):
    """An in-memory DuckDB that reads nothing outside what is registered on it; settings locked."""
    import duckdb

    import tempfile

    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                 "allow_community_extensions": False})
    # Spill to the process's private temp folder (the gateway's, under Landlock); then no file access at all.
    con.execute(f"SET temp_directory = '{tempfile.gettempdir()}/duckdb-spill'")
    con.execute(f"SET max_temp_directory_size = '{limits.max_temp_size}'")
    con.execute("SET enable_external_access = false")
    con.execute(f"SET memory_limit = '{limits.memory_limit}'")
    con.execute(f"SET threads = {int(limits.threads)}")
    con.execute("SET lock_configuration = true")
    return con


def register_project(con, lake: Lake, project: Project, needed: tuple[str, ...] = ()) -> dict[str, str]:
    """Register the published datasets of ``project`` as Arrow dataset views; return dataset -> view.

    A dataset whose table has deletion vectors is left out, and refused when
    it is one of ``needed`` (the datasets the query reads).
    """
    from deltalake import DeltaTable

    views = {}
    for dataset, uri in _published(lake, project).items():
        table = DeltaTable(uri)
        try:
            refuse_deletion_vectors(table, f"the {dataset} extract of project {project.id}")
        except QueryRefused:
            if dataset in needed:
                raise
            continue
        views[dataset] = f"q_{dataset}"
        con.register(views[dataset], table.to_pyarrow_dataset())
    return views


def add_actions(table) -> pa.Table:
    """The current files of a delta-rs table (path, size, records, partitions…) as a pyarrow table."""
    return pa.table(table.get_add_actions(flatten=True))


def refuse_deletion_vectors(table, what: str) -> None:
    """Refuse a Delta table whose files carry deletion vectors: its Parquet files alone still hold deleted rows."""
    if "deletionVectors" not in (table.protocol().reader_features or []):
        return
    if pa.RecordBatchReader.from_stream(table.deletion_vectors()).read_all().num_rows:
        raise QueryRefused(f"{what} has deletion vectors (rows deleted but still in its files), which this "
                           "gateway does not serve; ask the data stewards to purge them (REORG … APPLY (PURGE)) "
                           "or to republish the extract")


@contextlib.contextmanager
def time_limit(con, limits: Limits = DEFAULT_LIMITS, seconds: float | None = None):
    """Interrupt whatever runs on ``con`` past ``seconds`` (default ``limits.timeout_seconds``)."""
    timer = threading.Timer(limits.timeout_seconds if seconds is None else seconds, con.interrupt)
    timer.start()
    try:
        yield
    except QueryRefused:
        raise
    except Exception as exc:
        if type(exc).__name__ == "InterruptException" or "INTERRUPT" in str(exc).upper():
            raise QueryRefused(f"the query ran longer than {limits.timeout_seconds:g} s and was stopped") from None
        raise
    finally:
        timer.cancel()


def fetch(con, sql: str, limits: Limits = DEFAULT_LIMITS, seconds: float | None = None) -> pa.Table:
    """Run ``sql`` on ``con`` under the time (``seconds`` left of it) and row limits; a pyarrow table."""
    with time_limit(con, limits, seconds):
        reader = con.sql(sql).to_arrow_reader(batch_size=min(limits.max_rows + 1, 10_000))
        batches, rows = [], 0
        for batch in reader:
            batches.append(batch)
            rows += batch.num_rows
            if rows > limits.max_rows:
                raise QueryRefused(f"the result has more than {limits.max_rows} rows; aggregate or filter it")
        return pa.Table.from_batches(batches, schema=reader.schema)


def privacy_cost(project: Project) -> tuple[float, float] | None:
    """The (ε, δ) one query of ``project`` may spend; None for a row-level project (no budget)."""
    if project.row_level:
        return None
    return project.privacy.epsilon_per_query, project.privacy.delta_per_query


def answer(lake: Lake, project: Project, sql: str, limits: Limits = DEFAULT_LIMITS, user: str | None = None,
           today: dt.date | None = None, on_start=None) -> Answer:
    """Check, run and output-check ``sql`` on ``project``'s extract (no audit: the caller writes it).

    A row-level project's SQL runs in DuckDB and is output-checked; an
    aggregate-only project's SQL is answered with differentially private
    statistics (:mod:`jobs.privacy.private_aggregates`) after its cost is spent from
    ``user``'s budget (:mod:`jobs.privacy.privacy_budget`).

    ``on_start(note)`` is called once the query has passed its checks and
    before it reads any data (``note`` names the budget it will spend); it
    writes the audit's ``requested`` row and returns its event id.

    Raises :class:`QueryRefused` or :class:`jobs.privacy.disclosure.OutputRefused` with the reason.
    """
    from jobs.privacy import disclosure

    import time

    check_size(sql, limits)
    if not project.row_level:
        return private_answer(lake, project, sql, limits, user, today or clock.today(), on_start)
    started = time.monotonic()
    views = {d: f"q_{d}" for d in project.datasets}
    checked = check_sql(sql, project, ENGINE_DUCKDB, views)
    # Checking counts in the query's time: what is left is the engine's.
    left = limits.timeout_seconds - (time.monotonic() - started)
    if left <= 0:
        raise QueryRefused(f"checking the query took longer than {limits.timeout_seconds:g} s")
    con = locked_connection(limits)
    try:
        missing = [d for d in checked.datasets if d not in _published(lake, project)]
        if missing:
            raise QueryRefused(f"the {', '.join(missing)} extract of project {project.id} is not published yet")
        registered = register_project(con, lake, project, needed=checked.datasets)
        if on_start is not None:
            on_start("row-level project: no privacy budget")
        result = fetch(con, checked.sql, limits, left)
        with time_limit(con, limits, left):  # output checking runs queries of its own (support, differencing)
            output = disclosure.check_output(con, checked.sql, result, project, registered)
    finally:
        con.close()
    return Answer(table=output.table, checked=checked, suppressed_cells=output.suppressed_cells,
                  notes=list(output.notes))


def private_answer(lake: Lake, project: Project, sql: str, limits: Limits, user: str | None, today: dt.date,
                   on_start=None) -> Answer:
    """A differentially private answer: plan (no data read), spend the budget, then release under the time limit."""
    import concurrent.futures
    import time

    from jobs.privacy import privacy_budget, private_aggregates

    started = time.monotonic()
    plan = private_aggregates.plan(sql, project)
    if time.monotonic() - started > limits.timeout_seconds:
        raise QueryRefused(f"checking the query took longer than {limits.timeout_seconds:g} s")
    if user is None:
        raise QueryRefused("an aggregate-only project's answers spend a member's privacy budget; ask as a member")
    epsilon, delta = plan.epsilon(project), plan.delta(project)
    event_id = on_start(f"budget to spend: epsilon {epsilon:g}, delta {delta:g}") if on_start else None
    left = privacy_budget.spend(lake, project, user, epsilon, delta, today, event_id)
    # OpenDP and Polars cannot be interrupted: the release runs in a worker and the caller stops waiting.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dp-release")
    future = pool.submit(private_aggregates.release, lake, project, plan, epsilon, delta)
    try:
        released = future.result(timeout=max(limits.timeout_seconds - (time.monotonic() - started), 0.1))
    except concurrent.futures.TimeoutError:
        raise QueryRefused(f"the query ran longer than {limits.timeout_seconds:g} s and was stopped "
                           "(its budget stays spent)") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if released.table.num_rows > limits.max_rows:
        raise QueryRefused(f"the result has more than {limits.max_rows} rows; group by fewer keys")
    checked = CheckedQuery(sql=sql, datasets=tuple(sorted({s.dataset for s in plan.sources})), output_roles=None,
                           aggregate=True)
    budget_left = {"period": left.period, "epsilon": round(max(left.epsilon, 0.0), 12),
                   "delta": max(left.member_delta, 0.0)}
    return Answer(table=released.table, checked=checked, suppressed_cells=released.suppressed_cells,
                  notes=released.notes + [f"privacy budget: {left.describe()}"], epsilon=epsilon,
                  delta=released.delta, budget_left=budget_left)


def encode(table: pa.Table, fmt: str) -> bytes:
    """``table`` as CSV (formula-neutralised) or Parquet bytes."""
    from jobs.privacy import disclosure

    sink = io.BytesIO()
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(disclosure.neutralise_csv(table), sink)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, sink)
    else:
        raise QueryRefused(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    return sink.getvalue()


# ------------------------------------------------- in-process calls ----

def audit_event(consortium: Consortium, project_id: str, user: str, sql: str, action: str,
                token_id: str | None = None, export_format: str | None = None) -> dict:
    """The fields every audit row of one request shares."""
    import hashlib

    project = consortium.projects.get(project_id)
    return {"user": user, "token_id": token_id, "project_id": project_id,
            "purpose": project.purpose if project else None, "action": action, "engine": ENGINE_DUCKDB,
            "sql": sql[:AUDIT_SQL_CHARS], "sql_sha256": hashlib.sha256(sql.encode("utf-8")).hexdigest(),
            "policy_version": consortium.policy_version or "-", "export_format": export_format}


def audited_answer(lake: Lake, consortium: Consortium, project_id: str, user: str, sql: str, action: str,
                   today: dt.date | None = None, limits: Limits = DEFAULT_LIMITS, token_id: str | None = None,
                   export_format: str | None = None) -> tuple[Answer, dict]:
    """Check access, answer and write the audit row (refused, failed or allowed) before returning."""
    event = audit_event(consortium, project_id, user, sql, action, token_id, export_format)
    try:
        if export_format is not None and export_format not in EXPORT_FORMATS:
            raise QueryRefused(f"unknown export format {export_format!r}; use one of {', '.join(EXPORT_FORMATS)}")
        project = check_access(consortium, project_id, user, today or clock.today())
        result = answer(lake, project, sql, limits, user=user, today=today,
                        on_start=lambda note: write_audit(lake, event | {"outcome": OUTCOME_REQUESTED,
                                                                         "reason": note})["event_id"])
    except AccessDenied as exc:
        write_audit(lake, event | {"outcome": OUTCOME_REFUSED, "reason": str(exc)[:1000]})
        raise
    except Exception as exc:
        write_audit(lake, event | {"outcome": OUTCOME_FAILED, "reason": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    notes = [f"{result.suppressed_cells} cell(s) suppressed"] if result.suppressed_cells else []
    row = write_audit(lake, event | {"outcome": OUTCOME_ALLOWED, "rows_returned": result.table.num_rows,
                                     "reason": "; ".join(notes + result.notes)[:1000] or None})
    return result, row


def query(spark_or_none, lake: Lake, consortium: Consortium, project_id: str, user: str, sql: str,
          engine: str = ENGINE_DUCKDB, today: dt.date | None = None) -> pa.Table:
    """Run a query in this process (gateway, demo, benchmarks): checked, output-checked, audited.

    ``spark_or_none`` is ignored (kept for older callers): researcher SQL runs
    in DuckDB only; ``engine='spark'`` is refused and audited.

    Example::

        table = query(None, lake, consortium, "diabetes_outcomes", "alice.tremblay",
                      "SELECT visit_source_value, count(*) AS n FROM encounter GROUP BY 1")
    """
    if engine != ENGINE_DUCKDB:
        event = audit_event(consortium, project_id, user, sql, ACTION_QUERY)
        reason = f"engine {engine!r} refused: researcher SQL runs in DuckDB only, never in Spark"
        write_audit(lake, event | {"engine": str(engine)[:40] or "-", "outcome": OUTCOME_REFUSED, "reason": reason})
        raise QueryRefused(reason)
    result, _ = audited_answer(lake, consortium, project_id, user, sql, ACTION_QUERY, today)
    return result.table


def export(lake: Lake, consortium: Consortium, project_id: str, user: str, sql: str, destination: str,
           fmt: str = "csv", today: dt.date | None = None) -> ExportOutcome:
    """Write a checked, audited query result to ``destination`` as CSV or Parquet (in-process callers)."""
    from pathlib import Path

    result, _ = audited_answer(lake, consortium, project_id, user, sql, ACTION_EXPORT, today, export_format=fmt)
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    Path(destination).write_bytes(encode(result.table, fmt))
    return ExportOutcome(destination=destination, rows=result.table.num_rows,
                         suppressed_cells=result.suppressed_cells)
