"""Differentially private answers for aggregate-only projects (OpenDP's Polars context).

An aggregate-only project never returns a value computed from the data
without noise: its SQL is translated into an OpenDP Polars plan whose privacy
unit is one person (``person_id``), and OpenDP computes every released cell
with each person's contribution bounded and Laplace noise calibrated to that
bound and to the query's ε. Whatever the SQL asks, one person can move any
answer only within what ε allows, so renamed columns, ``CASE`` tricks,
``UNION ALL`` padding or differencing pairs buy nothing beyond the budget.

The query language is what the engine can bound, and nothing else::

    SELECT <key>, …, count(*) | count(col) | sum(col) | avg(col) [AS name], …
    SELECT <key>, …, count(DISTINCT person_id) [AS name]
    FROM <dataset> [AS a] [[INNER] JOIN <dataset> [AS b] ON a.person_id = b.person_id
                                                      [AND a.visit_occurrence_id = b.visit_occurrence_id]] …
    [WHERE <column> <op> <literal> | <column> IN (<literals>) | … AND / OR / NOT …]
    [GROUP BY <key>, …]

- keys are columns the project declares in ``privacy.public_keys`` (the
  released rows are exactly those declared values, never values read from the
  data) or in ``privacy.partition_selection`` (released only when OpenDP's
  noisy threshold lets them out, spending ``delta_per_query``);
- sums and means read only columns with ``privacy.bounds`` (values clipped);
- joins are inner joins within one person (the join always includes
  ``person_id``; a visit key is added to it), so a person's rows stay theirs;
- identifiers (``person_id``, record ids) may only be joined on and counted
  with ``count(*)``; they are never a key, a filter or an output;
- no subquery, CTE, set operation, window, ``CASE``, function, ``DISTINCT``,
  ``HAVING``, ``ORDER BY`` or ``LIMIT``: rows come back ordered by their keys.

Anything else is refused before any data is read, and refusal messages name
only the SQL and the policy, never a figure from the data.

After the noise, a second layer as trusted research environments expect:
a row whose noisy count is under ``min_cell_size`` has its cells suppressed
(keys stay, they are public), and counts are rounded to ``count_rounding``.
Each aggregate comes with the bounds of its 95 % interval
(``<name>_low95``/``<name>_high95``), from OpenDP's accuracy of the noise.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from jobs.core.config import Project, is_record_identifier
from jobs.core.lake import Lake
from jobs.privacy.policy import AccessDenied

PERSON = "person_id"
# Keys a join may use besides person_id: a visit belongs to one person.
JOIN_KEYS = ("visit_occurrence_id",)
# Largest SQL tree accepted: enough for real queries, small enough to check in milliseconds.
MAX_NODES = 400
# Largest grid of public keys a query may release.
MAX_CELLS = 20_000
# A public upper bound on the rows of any table, needed by OpenDP to bound float sums.
MAX_ROWS = 100_000_000
ALPHA = 0.05  # 95 % intervals
ROWS = "__rows"  # a hidden noisy row count, for suppression only

# The only SQL nodes the language has.
_ALLOWED_NODES = (exp.Select, exp.From, exp.Join, exp.Table, exp.TableAlias, exp.Identifier, exp.Column,
                  exp.Alias, exp.Count, exp.Star, exp.Sum, exp.Avg, exp.Group, exp.Where, exp.And, exp.Or,
                  exp.Not, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.In, exp.Literal, exp.Paren,
                  exp.Is, exp.Null, exp.Boolean, exp.Between, exp.Neg, exp.Distinct)
_SELECT_ARGS = {"expressions", "from", "from_", "joins", "where", "group", "kind"}
_COMPARISONS = {exp.EQ: "eq", exp.NEQ: "ne", exp.GT: "gt", exp.GTE: "ge", exp.LT: "lt", exp.LTE: "le"}


class AggregateRefused(AccessDenied):
    """The SQL is outside the differentially private query language; nothing was read."""


@dataclass(frozen=True)
class Aggregate:
    name: str
    kind: str  # 'count' (rows), 'persons', 'count_col', 'sum', 'mean'
    column: str | None  # internal column name


@dataclass(frozen=True)
class Source:
    alias: str
    dataset: str
    columns: tuple[str, ...]  # dataset columns the query reads
    join_keys: tuple[str, ...] = ()


@dataclass
class Plan:
    """A query translated for OpenDP, checked against the policy; no data read yet."""

    sources: list[Source]
    where: exp.Expression | None
    keys: list[tuple[str, str]]  # (output name, internal column)
    aggregates: list[Aggregate]
    output: list[str]
    public: bool  # every key has public values (pure ε, no δ)
    resolved: dict[str, tuple[str, str]] = field(default_factory=dict)  # internal -> (dataset, column)

    def epsilon(self, project: Project) -> float:
        return project.privacy.epsilon_per_query

    def delta(self, project: Project) -> float:
        return 0.0 if self.public else project.privacy.delta_per_query


@dataclass(frozen=True)
class Release:
    table: pa.Table
    epsilon: float
    delta: float
    suppressed_cells: int
    notes: list[str]



def plan(sql: str, project: Project) -> Plan:
    """Parse ``sql`` and translate it for OpenDP; :class:`AggregateRefused` with the reason otherwise."""
    try:
        statements = [s for s in sqlglot.parse(sql, read="duckdb") if s is not None]
    except SqlglotError as exc:
        raise AggregateRefused(f"the SQL does not parse: {str(exc).splitlines()[0][:300]}") from None
    except RecursionError:
        raise AggregateRefused("the SQL is nested too deeply") from None
    if len(statements) != 1:
        raise AggregateRefused(f"exactly one statement is allowed, got {len(statements)}")
    query = statements[0]
    if not isinstance(query, exp.Select):
        raise AggregateRefused(f"{query.key.upper()} is not allowed: an aggregate-only project answers one "
                               "SELECT of counts, sums and means, grouped by declared keys")
    nodes = 0
    for node in query.walk():
        nodes += 1
        if nodes > MAX_NODES:
            raise AggregateRefused(f"the query has more than {MAX_NODES} parts; use IN (…) for lists of values")
        if not isinstance(node, _ALLOWED_NODES):
            raise AggregateRefused(f"{node.key.upper()} is not part of the aggregate query language (counts, "
                                   "sums and means of the project's datasets, joined on person_id, filtered, "
                                   "grouped by declared keys)")
        if isinstance(node, exp.Select):
            extra = [k for k, v in node.args.items() if v not in (None, [], False) and k not in _SELECT_ARGS]
            if extra or node is not query or node.args.get("kind"):
                raise AggregateRefused(f"{(extra or ['a nested SELECT'])[0].upper()} is not part of the "
                                       "aggregate query language; rows come back ordered by their keys")
        if isinstance(node, (exp.Count, exp.Sum, exp.Avg)) and (node.find_ancestor(exp.Count, exp.Sum, exp.Avg)
                                                                or node.args.get("distinct")):
            raise AggregateRefused("nested or DISTINCT aggregates are not part of the aggregate query language")
        if isinstance(node, exp.Count) and isinstance(node.this, exp.Distinct) and not _counts_persons(node):
            raise AggregateRefused("count(DISTINCT …) counts persons only: count(DISTINCT person_id)")
    return _translate(query, project)


def _counts_persons(node: exp.Count) -> bool:
    values = node.this.expressions if isinstance(node.this, exp.Distinct) else []
    return len(values) == 1 and isinstance(values[0], exp.Column) and values[0].name == PERSON


def _translate(query: exp.Select, project: Project) -> Plan:
    privacy = project.privacy
    from_ = query.args.get("from") or query.args.get("from_")
    if from_ is None:
        raise AggregateRefused("the query reads none of the project's datasets")
    tables = [from_.this] + [j.this for j in query.args.get("joins") or []]
    aliases: dict[str, str] = {}
    for table in tables:
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            raise AggregateRefused("only the project's datasets, by name, may be read")
        if table.catalog or (table.db and table.db.lower() not in ("project", project.id)):
            raise AggregateRefused(f"table {table.sql()} is not one of project {project.id}'s datasets")
        if table.name not in project.datasets:
            raise AggregateRefused(f"table {table.name} is not one of project {project.id}'s datasets "
                                   f"({', '.join(sorted(project.datasets))})")
        alias = table.alias_or_name
        if table.args.get("alias") is not None and table.args["alias"].columns:
            raise AggregateRefused("column aliases on a table are not part of the aggregate query language")
        if alias in aliases:
            raise AggregateRefused(f"table alias {alias} is used twice")
        aliases[alias] = table.name

    def resolve(column: exp.Column) -> str:
        name, qualifier = column.name, column.table
        if qualifier:
            if qualifier not in aliases:
                raise AggregateRefused(f"unknown table {qualifier} in {column.sql()}")
            candidates = [qualifier]
        else:
            candidates = [a for a, d in aliases.items() if name in project.datasets[d]]
            if len(candidates) > 1 and name in (PERSON, *JOIN_KEYS):
                candidates = candidates[:1]
        candidates = [a for a in candidates if name in project.datasets[aliases[a]]]
        if len(candidates) != 1:
            raise AggregateRefused(f"column {column.sql()} is {'ambiguous' if candidates else 'unknown'} "
                                   f"in project {project.id}'s datasets")
        return f"{candidates[0]}.{name}"

    joins = query.args.get("joins") or []
    join_keys: dict[str, tuple[str, ...]] = {}
    for join in joins:
        if join.side or (join.kind and join.kind.upper() not in ("INNER",)) or join.args.get("method"):
            raise AggregateRefused("only inner joins on person_id (and visit keys) are allowed")
        right = join.this.alias_or_name
        using = [i.name for i in join.args.get("using") or []]
        pairs = []
        if using:
            pairs = [(u, u) for u in using]
        else:
            condition = join.args.get("on")
            conjuncts = list(condition.flatten()) if isinstance(condition, exp.And) else [condition]
            for conjunct in conjuncts:
                if not (isinstance(conjunct, exp.EQ) and isinstance(conjunct.this, exp.Column)
                        and isinstance(conjunct.expression, exp.Column)
                        and conjunct.this.name == conjunct.expression.name):
                    raise AggregateRefused("a join condition may only equate person_id or visit keys of two tables")
                pairs.append((conjunct.this.name, conjunct.this.name))
        keys = tuple(sorted({left for left, _ in pairs} | {PERSON}))
        if any(k not in (PERSON, *JOIN_KEYS) for k in keys):
            raise AggregateRefused(f"joins may use person_id and {', '.join(JOIN_KEYS)} only")
        join_keys[right] = keys

    columns: dict[str, set[str]] = {a: {PERSON} for a in aliases}
    for alias, keys in join_keys.items():
        columns[alias] |= set(keys)
    order = list(aliases)
    for alias, keys in join_keys.items():
        for key in keys:
            if key not in project.datasets[aliases[alias]]:
                raise AggregateRefused(f"{aliases[alias]} has no column {key} to join on")
            earlier = [a for a in order[:order.index(alias)] if key in project.datasets[aliases[a]]]
            if not earlier:
                raise AggregateRefused(f"no table before {alias} has {key} to join on")
            columns[earlier[0]].add(key)

    def use(column: exp.Column) -> str:
        internal = resolve(column)
        alias, name = internal.split(".", 1)
        columns[alias].add(name)
        return internal

    # WHERE: identifiers may not be filtered on (a filter naming one person is pointless under DP, and refused).
    where = query.args.get("where")
    where_expr = None
    if where is not None:
        where_expr = where.this.copy()
        for column in where_expr.find_all(exp.Column):
            if is_record_identifier(column.name):
                raise AggregateRefused(f"{column.name} is an identifier: it may be joined on, not filtered on")
            column.set("this", exp.to_identifier(use(column)))
            column.set("table", None)

    group = query.args.get("group")
    grouped: list[str] = []
    for key in (group.expressions if group is not None else []):
        if isinstance(key, exp.Literal) and key.is_int and 1 <= int(key.this) <= len(query.expressions):
            key = query.expressions[int(key.this) - 1]  # GROUP BY 1: the first selected column
            key = key.this if isinstance(key, exp.Alias) else key
        if not isinstance(key, exp.Column):
            raise AggregateRefused("GROUP BY takes declared key columns only")
        grouped.append(use(key))
    public = True
    for internal in grouped:
        name = internal.split(".", 1)[1]
        if is_record_identifier(name):  # even if a project file declared it
            raise AggregateRefused(f"{name} is an identifier: it is never a group key")
        if name in privacy.public_keys:
            continue
        if name in privacy.partition_selection:
            public = False
            continue
        raise AggregateRefused(f"{name} is not a declared key of project {project.id} (public: "
                               f"{', '.join(sorted(privacy.public_keys)) or 'none'}; by partition selection: "
                               f"{', '.join(privacy.partition_selection) or 'none'})")
    if len(set(grouped)) != len(grouped):
        raise AggregateRefused("a key is grouped on twice")

    output_keys: list[tuple[str, str]] = []
    aggregates: list[Aggregate] = []
    output: list[str] = []
    for item in query.expressions:
        name = item.alias_or_name if isinstance(item, exp.Alias) else ""
        inner = item.this if isinstance(item, exp.Alias) else item
        if isinstance(inner, exp.Column):
            internal = use(inner)
            if internal not in grouped:
                raise AggregateRefused(f"{inner.sql()} is not in GROUP BY: only keys and aggregates are returned")
            name = name or inner.name
            output_keys.append((name, internal))
        elif isinstance(inner, exp.Count):
            arg = inner.this
            name = name or f"count_{len(aggregates)}"
            if _counts_persons(inner):
                aggregates.append(Aggregate(name, "persons", None))
            elif isinstance(arg, exp.Star) or arg is None:
                aggregates.append(Aggregate(name, "count", None))
            elif isinstance(arg, exp.Column):
                internal = use(arg)
                kind = "count" if is_record_identifier(arg.name) else "count_col"
                aggregates.append(Aggregate(name, kind, None if kind == "count" else internal))
            else:
                raise AggregateRefused("count takes * or one column")
        elif isinstance(inner, (exp.Sum, exp.Avg)):
            arg = inner.this
            if not isinstance(arg, exp.Column):
                raise AggregateRefused(f"{inner.key} takes one column")
            internal = use(arg)
            if arg.name not in privacy.bounds:
                raise AggregateRefused(f"{arg.name} has no declared bounds in project {project.id}: sums and means "
                                       f"read only {', '.join(sorted(privacy.bounds)) or 'no column'}")
            name = name or f"{inner.key}_{arg.name}"
            aggregates.append(Aggregate(name, "sum" if isinstance(inner, exp.Sum) else "mean", internal))
        else:
            raise AggregateRefused(f"{inner.sql()[:80]} is neither a key nor count/sum/avg of a column")
        if name in output:
            raise AggregateRefused(f"output column {name} is named twice")
        output.append(name)
    if not aggregates:
        raise AggregateRefused("an aggregate-only project returns counts, sums or means: add one")
    if any(a.kind == "persons" for a in aggregates) and any(a.kind != "persons" for a in aggregates):
        raise AggregateRefused("count(DISTINCT person_id) is answered in a query of its own (it counts each "
                               "person once per group, other aggregates count rows)")
    if set(grouped) - {k for _, k in output_keys}:
        raise AggregateRefused("every GROUP BY key must be selected (a hidden key splits cells unseen)")
    if public and grouped:
        cells = math.prod(len(privacy.public_keys[g.split(".", 1)[1]]) for g in grouped)
        if cells > MAX_CELLS:
            raise AggregateRefused(f"the keys make {cells} cells; at most {MAX_CELLS} per query")
    sources = [Source(alias=a, dataset=d, columns=tuple(sorted(columns[a])), join_keys=join_keys.get(a, ()))
               for a, d in aliases.items()]
    return Plan(sources=sources, where=where_expr, keys=output_keys, aggregates=aggregates, output=output, public=public,
                resolved={f"{a}.{c}": (aliases[a], c) for a in aliases for c in columns[a]})


# ---------------------------------------------------------- running ----

def _frame(lake: Lake, project: Project, plan_: Plan):
    """The joined rows the plan reads, as one Polars LazyFrame (columns named ``alias.column``)."""
    import polars as pl
    from deltalake import DeltaTable

    from jobs.research.access import refuse_deletion_vectors
    from jobs.core.arrow_tables import delta_uri

    frame = None
    for source in plan_.sources:
        uri = delta_uri(lake.project(project.id, source.dataset))
        if not DeltaTable.is_deltatable(uri):
            raise AggregateRefused(f"the {source.dataset} extract of project {project.id} is not published yet")
        table = DeltaTable(uri)
        refuse_deletion_vectors(table, f"the {source.dataset} extract of project {project.id}")
        data = pl.DataFrame(table.to_pyarrow_table(columns=list(source.columns))).rename(
            {c: (c if c == PERSON else f"{source.alias}.{c}") for c in source.columns}).lazy()
        if frame is None:
            frame = data
            continue
        # Within one person: person_id always, and the visit key when named; left keys are kept.
        left = [PERSON] + [_left_column(plan_, source, k) for k in source.join_keys if k != PERSON]
        right = [PERSON] + [f"{source.alias}.{k}" for k in source.join_keys if k != PERSON]
        frame = frame.join(data, left_on=left, right_on=right, how="inner")
        for key, left_name in zip(right[1:], left[1:]):
            frame = frame.with_columns(pl.col(left_name).alias(key))
    return frame


def _left_column(plan_: Plan, source: Source, key: str) -> str:
    for other in plan_.sources:
        if other is source:
            break
        if key in other.columns:
            return f"{other.alias}.{key}"
    raise AggregateRefused(f"no table before {source.alias} has {key} to join on")


def _literal(node: exp.Expression, dtype):
    import polars as pl

    if isinstance(node, exp.Neg):
        value = _literal(node.this, dtype)
        return -value
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if not isinstance(node, exp.Literal):
        raise AggregateRefused("a condition compares a column with constants only")
    text = node.this
    try:
        if dtype == pl.Date:
            return dt.date.fromisoformat(text)
        if dtype.is_integer():
            return int(text)
        if dtype.is_float():
            return float(text)
        if dtype == pl.Boolean:
            return text.lower() == "true"
    except ValueError:
        raise AggregateRefused(f"{node.sql()} is not a value of type {dtype}") from None
    return text


def _condition(node: exp.Expression, schema):
    """The WHERE as a Polars expression (the columns were already resolved to internal names)."""
    import polars as pl

    if isinstance(node, exp.Paren):
        return _condition(node.this, schema)
    if isinstance(node, exp.And):
        return _condition(node.this, schema) & _condition(node.expression, schema)
    if isinstance(node, exp.Or):
        return _condition(node.this, schema) | _condition(node.expression, schema)
    if isinstance(node, exp.Not):
        return _condition(node.this, schema).not_()
    if isinstance(node, exp.Is):
        if not isinstance(node.this, exp.Column) or not isinstance(node.expression, exp.Null):
            raise AggregateRefused("IS compares a column with NULL only")
        return pl.col(node.this.name).is_null()
    if isinstance(node, exp.In):
        column = node.this
        if not isinstance(column, exp.Column) or node.args.get("query") is not None:
            raise AggregateRefused("IN takes a column and a list of constants")
        dtype = schema[column.name]
        return pl.col(column.name).is_in([_literal(v, dtype) for v in node.expressions])
    if isinstance(node, exp.Between):
        column = node.this
        if not isinstance(column, exp.Column):
            raise AggregateRefused("BETWEEN takes a column and two constants")
        dtype = schema[column.name]
        return pl.col(column.name).is_between(_literal(node.args["low"], dtype), _literal(node.args["high"], dtype))
    for kind, method in _COMPARISONS.items():
        if isinstance(node, kind):
            left, right = node.this, node.expression
            if isinstance(right, exp.Column) and not isinstance(left, exp.Column):
                left, right = right, left
                method = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}.get(method, method)
            if not isinstance(left, exp.Column) or isinstance(right, exp.Column):
                raise AggregateRefused("a condition compares a column with a constant")
            return getattr(pl.col(left.name), method)(_literal(right, schema[left.name]))
    raise AggregateRefused(f"{node.sql()[:80]} is not a supported condition")


def _keys_frame(project: Project, plan_: Plan, schema):
    """Every combination of the declared public values of the plan's keys (never read from the data)."""
    import polars as pl

    frame = None
    for _, internal in plan_.keys:
        values = project.privacy.public_keys[internal.split(".", 1)[1]]
        column = pl.DataFrame({internal: values}, strict=False).with_columns(pl.col(internal).cast(schema[internal]))
        frame = column if frame is None else frame.join(column, how="cross")
    return frame


def release(lake: Lake, project: Project, plan_: Plan, epsilon: float, delta: float,
            deadline: float | None = None) -> Release:
    """Run ``plan_`` in OpenDP under (ε, δ) and apply the second layer; refusals carry no data figure."""
    import opendp.prelude as dp
    import polars as pl

    dp.enable_features("contrib")
    frame = _frame(lake, project, plan_)
    schema = frame.collect_schema()
    if plan_.where is not None:
        # A row-wise filter before the engine keeps each person's rows theirs: the bound still holds.
        frame = frame.filter(_condition(plan_.where, schema))
    privacy = project.privacy
    by = [internal for _, internal in plan_.keys]
    if any(a.kind == "persons" for a in plan_.aggregates):
        # One row per person and group: the engine's row count is then a count of persons.
        frame = frame.select([PERSON, *by]).unique()
    loss = dp.loss_of(epsilon=epsilon, delta=delta) if delta > 0 else dp.loss_of(epsilon=epsilon)
    context = dp.Context.compositor(
        # opendp documents an expression as an identifier, though its annotation says str.
        data=frame, privacy_unit=dp.unit_of(contributions=1, identifier=pl.col(PERSON)),  # type: ignore[arg-type]
        privacy_loss=loss,
        split_evenly_over=1, margins=[dp.polars.Margin(by=by, max_length=MAX_ROWS)]
        + ([dp.polars.Margin(by=[], max_length=MAX_ROWS)] if by else []))
    persons = any(a.kind == "persons" for a in plan_.aggregates)
    # After one row per person and group, a person has at most as many rows as there are cells.
    bound = 1 if persons and not by else privacy.max_rows_per_person
    query = context.query().truncate_per_group(bound)
    # ``.dp`` is the expression namespace opendp registers on polars at import: polars' types do not know it.
    expressions: list[pl.Expr] = []
    hidden: dict[str, tuple[str, str, float, float]] = {}
    for aggregate in plan_.aggregates:
        column = aggregate.column or ""  # set for every kind but count and persons
        if aggregate.kind in ("count", "persons"):
            expressions.append(dp.len(signed=True).alias(aggregate.name))
        elif aggregate.kind == "count_col":
            expressions.append(pl.col(column).dp.count(signed=True).alias(aggregate.name))  # type: ignore[attr-defined]
        else:
            low, high = privacy.bounds[plan_.resolved[column][1]]
            value = pl.col(column).cast(pl.Float64)
            total = f"__sum_{len(hidden)}"
            expressions.append(value.fill_null(0.0).dp.sum((float(low), float(high))).alias(  # type: ignore[attr-defined]
                aggregate.name if aggregate.kind == "sum" else total))
            if aggregate.kind == "mean":
                count = f"__count_{len(hidden)}"
                expressions.append(pl.col(column).dp.count(signed=True).alias(count))  # type: ignore[attr-defined]
                hidden[aggregate.name] = (total, count, float(low), float(high))
    if not any(a.kind in ("count", "persons", "count_col") for a in plan_.aggregates):
        # Sums alone: a noisy row count too, so that the second layer can suppress small cells.
        expressions.append(dp.len(signed=True).alias(ROWS))
    query = query.group_by(by).agg(*expressions) if by else query.select(*expressions)
    if by and plan_.public:
        query = query.with_keys(_keys_frame(project, plan_, schema))
    try:
        from opendp.accuracy import summarize_polars_measurement

        measurement = _measurement(query)
        accuracy = {r["column"]: r["accuracy"] for r in summarize_polars_measurement(measurement, ALPHA).to_dicts()}
    except Exception as exc:  # OpenDP refuses what it cannot bound; built before any row is read, it names the plan
        if type(exc).__name__ != "OpenDPException":
            raise
        raise AggregateRefused(f"the privacy engine cannot bound this query: "
                               f"{str(exc).strip().splitlines()[0][:300]}") from None
    try:
        released = context(measurement).collect()
    except Exception as exc:
        # An error while reading rows may quote a value: name its kind only.
        raise AggregateRefused(f"the query failed while running ({type(exc).__name__})") from None
    return _second_layer(project, plan_, released, accuracy, hidden, epsilon, delta)


def _measurement(query):
    """OpenDP's measurement for ``query`` at the smallest noise its (ε, δ) allows.

    Laplace noise's ε is proportional to 1/scale, so the scale is solved from
    one measurement instead of OpenDP's generic binary search (a thousand
    plan builds); the result is checked by OpenDP itself before it is used.
    """
    from opendp.measurements import make_private_lazyframe
    from opendp.mod import binary_search

    plan_ = object.__getattribute__(query, "polars_plan")
    inner = object.__getattribute__(query, "_query")
    domain, metric = inner._chain
    d_in, d_out = inner._d_in, inner._d_out
    approximate = isinstance(d_out, tuple)

    def make(scale, threshold=None):
        return make_private_lazyframe(input_domain=domain, input_metric=metric, output_measure=inner._output_measure,
                                      lazyframe=plan_, global_scale=scale, threshold=threshold)

    epsilon = d_out[0] if approximate else d_out
    at_one = make(1.0, threshold=2**32 - 1 if approximate else None).map(d_in)
    scale = (at_one[0] if approximate else at_one) / epsilon * (1 + 1e-9)
    threshold = None
    if approximate:
        try:
            make(scale)  # public keys: no threshold needed
        except Exception:
            threshold = binary_search(lambda t: make(scale, t).map(d_in)[1] < d_out[1], T=int)
    for _ in range(50):
        measurement = make(scale, threshold)
        if measurement.check(d_in, d_out):
            return measurement
        scale *= 1.001
    raise AggregateRefused("the privacy engine could not calibrate the noise for this query")


def _second_layer(project: Project, plan_: Plan, released, accuracy: dict, hidden: dict,
                  epsilon: float, delta: float) -> Release:
    """Means from noisy sums and counts, 95 % intervals, suppression under min_cell_size, rounding of counts."""
    rows = released.sort([k for _, k in plan_.keys]).to_dicts() if plan_.keys else released.to_dicts()
    base = project.count_rounding
    suppressed = 0
    out: dict[str, list] = {name: [] for name in plan_.output}
    bounds_of: dict[str, list] = {}
    counts = [a.name for a in plan_.aggregates if a.kind in ("count", "count_col", "persons")]
    for row in rows:
        small = any((row[c] if row[c] is not None else 0) < project.min_cell_size for c in counts)
        small = small or any((row[h[1]] or 0) < project.min_cell_size for h in hidden.values())
        small = small or (ROWS in row and (row[ROWS] or 0) < project.min_cell_size)
        for name, internal in plan_.keys:
            out[name].append(row[internal])
        cells = [(aggregate, *_cell(aggregate, row, accuracy, hidden, base)) for aggregate in plan_.aggregates]
        # A noisy count just over the threshold can round under it (12 → 10 with a base of 5): the
        # released, rounded count is held to the threshold too.
        small = small or any(a.name in counts and v is not None and v < project.min_cell_size
                             for a, v, _, _ in cells)
        for aggregate, value, low, high in cells:
            if small:
                value = low = high = None
                suppressed += 1
            out[aggregate.name].append(value)
            bounds_of.setdefault(aggregate.name, []).append(
                (None if low is None else round(low, 2), None if high is None else round(high, 2)))
    columns, arrays = [], []
    for name in plan_.output:
        columns.append(name)
        arrays.append(pa.array(out[name]))
        if name in bounds_of:
            columns += [f"{name}_low95", f"{name}_high95"]
            arrays += [pa.array([b[0] for b in bounds_of[name]], pa.float64()),
                       pa.array([b[1] for b in bounds_of[name]], pa.float64())]
    notes = [f"differentially private (OpenDP): epsilon {epsilon:g}" + (f", delta {delta:g}" if delta else "")
             + f"; each person counts for at most {project.privacy.max_rows_per_person} rows; "
             "low95/high95 bound each cell's 95 % interval"]
    if suppressed:
        notes.append(f"cells whose noisy count is under {project.min_cell_size} are suppressed")
    return Release(table=pa.Table.from_arrays(arrays, names=columns), epsilon=epsilon, delta=delta,
                   suppressed_cells=suppressed, notes=notes)


def _cell(aggregate: Aggregate, row: dict, accuracy: dict, hidden: dict, base: int):
    if aggregate.kind in ("count", "count_col", "persons"):
        # The interval is around the released (rounded) count, widened by the rounding.
        error = accuracy.get(aggregate.name, 0.0) + base / 2
        rounded = int(base * math.floor(max(row[aggregate.name], 0) / base + 0.5))
        return rounded, max(rounded - error, 0.0), rounded + error
    if aggregate.kind == "sum":
        value, error = row[aggregate.name], accuracy.get(aggregate.name, 0.0)
        return value, value - error, value + error
    total, count, low, high = hidden[aggregate.name]
    s, n = row[total], row[count]
    s_error, n_error = accuracy.get(total, 0.0), accuracy.get(count, 0.0)
    if not n or n <= 0:
        return None, low, high
    mean = min(max(s / n, low), high)
    if n - n_error <= 0:
        return mean, low, high
    # Every (sum, count) pair inside both intervals gives a mean inside these bounds.
    candidates = [(s + ds) / (n + dn) for ds in (-s_error, s_error) for dn in (-n_error, n_error)]
    return mean, max(min(candidates), low), min(max(candidates), high)
