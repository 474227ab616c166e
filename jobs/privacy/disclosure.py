"""Output checking of results read with SQL (row-level projects), and CSV neutralisation of every export.

Aggregate-only projects no longer reach the rules below through the
gateway: their answers are differentially private statistics
(:mod:`jobs.privacy.private_aggregates`), whose bound holds whatever the SQL's shape.
The rules stay for callers that check an aggregate result read with SQL.

The gateway calls :func:`check_output` on every result, and :func:`neutralise_csv`
before a CSV is written. The checks are decided on the result and on the
lineage of its rows, never on the surface shape of the SQL: a CTE, a derived
table, a window or a set operation cannot hide an aggregate or a person.

Design (each rule fails closed: what cannot be checked is refused, with the
reason and how to rewrite the query):

1. **Row-level results** leave only for a project that declares
   ``row_level: true``; such results are returned as they are. Otherwise:

   - a result column whose values are ``person_id``\\ s of the project's tables
     is refused (checked on the result, against the registered tables);
   - every branch of the result must be an aggregate (``GROUP BY`` or an
     aggregate function at its top level), possibly wrapped in plain
     ``SELECT … FROM (aggregate)`` layers. A window function or a subquery in
     the select list at or above the aggregate is refused (it copies one
     group's value into another row), as are ``INTERSECT``/``EXCEPT`` of
     aggregates, ``QUALIFY``, and aggregates that return record values
     (``list``, ``string_agg``, ``arg_max``…).

2. **Support per row.** The query is rewritten with sqlglot so that the
   aggregate level also computes ``count(DISTINCT person_id)`` per group, and
   the rewritten query is what runs (so the values and their support come
   from one execution). ``person_id`` is traced through derived tables and
   CTEs (inlined at the point of use) by appending it to their select list:
   through plain selects and ``UNION ALL``; through ``DISTINCT``, ``UNION``
   and ``GROUP BY`` only when the person is already an output column or a
   grouping key (otherwise appending it would change the rows). A join
   counts each side's persons and keeps the smallest. When the persons
   behind a row cannot be traced (a subquery that aggregates away
   ``person_id``, ``LIMIT`` or ``SAMPLE`` inside a subquery), the result is
   refused.

3. **Primary suppression.** A row whose support is under
   ``project.min_cell_size``, or one of whose count cells (``COUNT``,
   ``COUNT_IF``, approximate distinct counts) is, has all its aggregate
   cells nulled (a mean over three persons is as disclosive as their count).
   Group keys stay, except when rows were chosen or ordered on aggregate
   values (``HAVING``, ``ORDER BY count(*)``, ``LIMIT``, a ``WHERE`` above
   the aggregate): then suppressed
   rows are removed, since their presence alone would tell the hidden value.

4. **Secondary suppression.** For every grouping key, rows that agree on all
   the other keys form a one-dimensional breakdown (a ``ROLLUP`` or
   ``GROUPING SETS`` total row belongs to it with a null key). Whether or not
   the total is in the result (another query can fetch it), a breakdown with
   exactly one suppressed row gets its smallest other row (by support,
   preferring detail rows over totals) suppressed too. This repeats until no
   breakdown has a lone suppressed row. A result without keys is one
   breakdown.

5. **Rounding.** Every count of the aggregate level is rounded to the
   nearest multiple of ``project.count_rounding`` (half up) inside the
   rewritten SQL, so no expression over it (``count(*) + 0``, a ratio, a
   filter above) sees the exact value; the support uses the raw counts.

6. **Differencing.** For every ``SELECT`` of the query (top level, CTEs,
   subqueries) with a ``WHERE`` (or extra conditions in an inner join's
   ``ON``), each conjunct of the condition is measured on ``con``: how many
   distinct persons it removes from its ``FROM`` on its own, and how many it
   removes given the other conjuncts. A conjunct that removes between 1 and
   ``min_cell_size - 1`` persons either way singles them out and the query is
   refused. The first measure does not depend on the persons' other values,
   so the refusal of ``… AND person_id <> 'x'`` tells nothing about ``x``.
   Conditions inside aggregates (``FILTER``, ``CASE WHEN`` in a ``sum``,
   ``count_if``) and in the select lists of row-level subqueries are measured
   the same way, on their own (persons they select and persons they leave
   out); a disjunct of an ``OR`` is measured for the persons it adds. A
   ``HAVING`` on rows grouped per ``person_id`` is measured like a ``WHERE``;
   any other ``HAVING`` may not name ``person_id``, and conditions inside its
   aggregates are measured (a large group shown or hidden as one person is
   in it would tell their diagnosis).
   Conditions on aggregated rows (above a ``GROUP BY``) and in grouping keys
   make groups, whose cells are checked as above. ``person_id`` itself may
   only be selected, counted, grouped, joined or filtered on: a function of
   it elsewhere would single out a person with no condition to measure. A correlated subquery's own condition is
   measured as part of the outer conjunct that holds it. Outer joins with
   conditions beyond column equalities are refused (they filter one side
   without removing its rows).

Limits: the check is stateless; two queries that each remove at least
``min_cell_size`` persons (``NOT IN`` of 11 and of 12 persons) can still be
differenced, blurred only by rounding. The audit log is where such series
are found.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.simplify import simplify

from jobs.core.config import Project
from jobs.privacy.policy import AccessDenied

# Characters that make a spreadsheet read a cell as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
SUPPORT_COLUMN = "__support"
ROLE_KEY = "key"
ROLE_COUNT = "count"
ROLE_AGGREGATE = "aggregate"

_COUNTS = (exp.Count, exp.CountIf, exp.ApproxDistinct)
# Aggregates that summarise a group; others (list, string_agg, arg_max, first,
# mode…) return a record's own value and are refused.
_SUMMARY_AGGREGATES = _COUNTS + (
    exp.Sum, exp.Avg, exp.Min, exp.Max, exp.Median, exp.Quantile, exp.ApproxQuantile, exp.PercentileCont,
    exp.PercentileDisc, exp.Stddev, exp.StddevPop, exp.StddevSamp, exp.Variance, exp.VariancePop, exp.Corr,
    exp.CovarSamp, exp.CovarPop, exp.Grouping,
)
_REWRITE_ADVICE = ("Rewrite it as one aggregate (GROUP BY … with COUNT) over the project's tables, "
                   "keeping person_id in every subquery or CTE it reads from.")


class OutputRefused(AccessDenied):
    """The result could disclose a person; the message says why and how to rewrite the query."""


@dataclass(frozen=True)
class CheckedOutput:
    """A result that may leave: cells under the threshold nulled, counts rounded."""

    table: pa.Table
    suppressed_cells: int
    notes: list[str] = field(default_factory=list)


class _Untraceable(Exception):
    """The persons behind a row cannot be traced through this part of the query."""


# ------------------------------------------------------------ query shape ----

def _own(node: exp.Expression, select: exp.Expression) -> bool:
    """True when ``node`` belongs to ``select`` itself, not to a subquery inside it."""
    return node.find_ancestor(exp.Select, exp.SetOperation) is select


def _aggregates(select: exp.Select) -> list[exp.AggFunc]:
    found = []
    for projection in select.expressions:
        found += [a for a in projection.find_all(exp.AggFunc)
                  if _own(a, select) and not a.find_ancestor(exp.Window)]
    return found


def _is_aggregate(select: exp.Select) -> bool:
    return bool(select.args.get("group")) or bool(_aggregates(select))


def _conjuncts(condition: exp.Expression | None) -> list[exp.Expr]:
    if condition is None:
        return []
    try:
        condition = simplify(condition.copy(), dialect="duckdb")
    except (SqlglotError, RecursionError, ValueError):
        condition = condition.copy()
    return [c.unnest() for c in condition.flatten()] if isinstance(condition, exp.And) else [condition.unnest()]


def _same_column(expression: exp.Expr, column: exp.Column) -> bool:
    expression = expression.unalias() if isinstance(expression, exp.Alias) else expression
    return (isinstance(expression, exp.Column) and expression.name == column.name
            and expression.table in ("", column.table))


def _role(projection: exp.Expression) -> str:
    inner = projection.unalias() if isinstance(projection, exp.Alias) else projection
    while isinstance(inner, (exp.Cast, exp.Paren)):
        inner = inner.this
    if isinstance(inner, _COUNTS):
        return ROLE_COUNT
    return ROLE_AGGREGATE if any(True for _ in projection.find_all(exp.AggFunc)) else ROLE_KEY


def _merged_role(a: str, b: str) -> str:
    if a == b:
        return a
    return ROLE_AGGREGATE if ROLE_KEY in (a, b) else ROLE_COUNT


class _Lineage:
    """Rewrites a query so that each row's persons can be counted."""

    def __init__(self, views: dict[str, str], ctes: dict[str, exp.Expression], rounding: int = 1):
        self.person_tables = set(views.values())
        self.ctes = ctes
        self.rounding = rounding
        self.counter = 0

    def fresh(self, prefix: str = "__pid") -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def of_select(self, select: exp.Select) -> list[exp.Column]:
        """The person_id of every source of ``select`` (FROM and joins), as columns in its scope."""
        sources = []
        if select.args.get("from_"):
            sources.append(select.args["from_"].this)
        sources += [join.this for join in select.args.get("joins") or []]
        persons: list[exp.Column] = []
        for source in sources:
            persons += self._of_source(source)
        return persons

    def _of_source(self, source: exp.Expression) -> list[exp.Column]:
        if isinstance(source, exp.Table) and not source.args.get("db"):
            if source.name in self.ctes:
                alias = source.alias_or_name
                derived = exp.Subquery(this=self.ctes[source.name].copy(),
                                       alias=exp.TableAlias(this=exp.to_identifier(alias)))
                source.replace(derived)
                return self._of_source(derived)
            if source.name in self.person_tables:
                return [exp.column("person_id", table=source.alias_or_name)]
            return []
        if isinstance(source, exp.Subquery):
            if not source.alias:
                source.set("alias", exp.TableAlias(this=exp.to_identifier(self.fresh("__derived"))))
            return [exp.column(name, table=source.alias) for name in self.expose(source.this)]
        if source.find(exp.Table):
            raise _Untraceable(f"the persons read through {source.sql('duckdb')[:60]!r} cannot be traced")
        return []  # VALUES and other constant sources hold no person

    def expose(self, query: exp.Expression, rows_fixed: bool = False) -> list[str]:
        """Append the persons of ``query``'s rows to its output; the new column names.

        ``rows_fixed``: the rows are deduplicated above (UNION, DISTINCT), so
        only a person already in the output may be appended.
        """
        if isinstance(query, exp.Subquery):
            return self.expose(query.this, rows_fixed)
        if isinstance(query, exp.SetOperation):
            distinct = not isinstance(query, exp.Union) or bool(query.args.get("distinct"))
            left = self.expose(query.this, rows_fixed or distinct)
            right = self.expose(query.expression, rows_fixed or distinct)
            if len(left) != len(right):
                raise _Untraceable("the branches of a set operation read persons from a different number of tables")
            return left
        if not isinstance(query, exp.Select):
            raise _Untraceable(f"cannot trace persons through {type(query).__name__}")
        for clause in ("limit", "offset", "sample", "qualify"):
            if query.args.get(clause):
                raise _Untraceable(f"{clause.upper()} inside a subquery selects persons by position or rank")
        persons = self.of_select(query)
        grouped = _is_aggregate(query)
        if grouped or query.args.get("distinct") or rows_fixed:
            keys = list(query.expressions)
            group = query.args.get("group")
            if grouped and group is not None:
                keys += list(group.expressions)
            persons = [p for p in persons if any(_same_column(k, p) for k in keys)]
            if not persons:
                raise _Untraceable("a subquery aggregates or deduplicates rows without keeping person_id")
        names = []
        for person in persons:
            names.append(self.fresh())
            query.select(exp.alias_(person.copy(), names[-1]), copy=False)
        return names

    def plan(self, query: exp.Expr) -> tuple[list[str], bool]:
        """Add the support column to the aggregate level; the role of each output column, and
        whether rows were filtered on aggregate values."""
        if isinstance(query, exp.Subquery):
            return self.plan(query.this)
        if isinstance(query, exp.SetOperation):
            if not isinstance(query, exp.Union):
                raise OutputRefused("INTERSECT and EXCEPT of aggregates compare groups cell by cell; "
                                    "combine aggregates with UNION ALL.")
            left, left_filtered = self.plan(query.this)
            right, right_filtered = self.plan(query.expression)
            if len(left) != len(right):
                raise OutputRefused("the branches of the UNION return different numbers of columns")
            return [_merged_role(a, b) for a, b in zip(left, right)], left_filtered or right_filtered
        if not isinstance(query, exp.Select):
            raise OutputRefused(f"a {type(query).__name__} result cannot be checked. {_REWRITE_ADVICE}")
        _refuse_cross_row_values(query)
        if _is_aggregate(query):
            return self._plan_aggregate(query)
        return self._plan_wrapper(query)

    def _plan_aggregate(self, select: exp.Select) -> tuple[list[str], bool]:
        for aggregate in _aggregates(select):
            if not isinstance(aggregate, _SUMMARY_AGGREGATES):
                raise OutputRefused(f"the aggregate {aggregate.sql('duckdb')[:60]!r} returns a record's own value; "
                                    "only counts and summaries (sum, avg, min, max, quantiles…) may leave.")
        try:
            persons = self.of_select(select)
        except _Untraceable as exc:
            raise OutputRefused(f"output checking needs the persons behind each group, but {exc}. "
                                f"{_REWRITE_ADVICE}") from None
        if not persons:
            raise OutputRefused(f"the aggregate reads none of the project's tables directly. {_REWRITE_ADVICE}")
        roles = [_role(p) for p in select.expressions]
        # Support: the persons of each source, and every count cell itself.
        raw_counts = self._round_counts(select)
        counts = [exp.Count(this=exp.Distinct(expressions=[p.copy()])) for p in persons] + raw_counts
        support = counts[0] if len(counts) == 1 else exp.Least(this=counts[0], expressions=counts[1:])
        select.select(exp.alias_(support, SUPPORT_COLUMN), copy=False)
        # Rows chosen or ordered on aggregate values tell the hidden ones by their presence or place.
        order = select.args.get("order")
        filtered = bool(select.args.get("having") or select.args.get("limit") or select.args.get("offset")
                        or (order is not None and any(True for _ in order.find_all(exp.AggFunc))))
        return roles, filtered

    def _round_counts(self, select: exp.Select) -> list[exp.Expression]:
        """Round every count of ``select`` (select list and HAVING) in the SQL itself; the raw counts.

        Rounding inside the query means no expression over a count
        (``count(*) + 0``, a ratio, a filter on it above) sees the exact value.
        """
        raw = []
        having = select.args.get("having")
        for root in [*select.expressions, *([having] if having is not None else [])]:
            for count in list(root.find_all(*_COUNTS)):
                if not _own(count, select) or count.find_ancestor(exp.Window):
                    continue
                node = count.parent if isinstance(count.parent, exp.Filter) else count
                if root is not having and self.rounding > 1:
                    raw.append(node.copy())
                if self.rounding > 1:
                    base = exp.Literal.number(self.rounding)
                    rounded = exp.Mul(this=exp.Round(this=exp.Div(this=node.copy(), expression=base.copy())),
                                      expression=base)
                    node.replace(exp.Cast(this=rounded, to=exp.DataType.build("BIGINT")))
                elif root is not having:
                    raw.append(node.copy())
        return raw

    def _plan_wrapper(self, select: exp.Select) -> tuple[list[str], bool]:
        source = select.args["from_"].this if select.args.get("from_") else None
        if select.args.get("joins") or source is None:
            raise _row_level()
        if isinstance(source, exp.Table) and not source.args.get("db") and source.name in self.ctes:
            derived = exp.Subquery(this=self.ctes[source.name].copy(),
                                   alias=exp.TableAlias(this=exp.to_identifier(source.alias_or_name)))
            source.replace(derived)
            source = derived
        if not isinstance(source, exp.Subquery):
            raise _row_level()
        if not source.alias:
            source.set("alias", exp.TableAlias(this=exp.to_identifier(self.fresh("__derived"))))
        inner_roles, filtered = self.plan(source.this)
        inner = source.this
        while isinstance(inner, (exp.SetOperation, exp.Subquery)):
            inner = inner.this
        by_name = {p.alias_or_name: role for p, role in zip(inner.expressions, inner_roles)}
        roles = []
        for projection in select.expressions:
            star = projection if isinstance(projection, exp.Star) else projection.this if (
                isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star)) else None
            if star is not None:
                star.set("except_", [*(star.args.get("except_") or []), exp.column(SUPPORT_COLUMN)])
                roles += inner_roles
            elif isinstance(projection.unalias(), exp.Column) and projection.unalias().name in by_name:
                roles.append(by_name[projection.unalias().name])
            else:
                used = [by_name.get(c.name, ROLE_AGGREGATE) for c in projection.find_all(exp.Column)]
                roles.append(ROLE_KEY if all(r == ROLE_KEY for r in used) else ROLE_AGGREGATE)
        select.select(exp.alias_(exp.column(SUPPORT_COLUMN, table=source.alias), SUPPORT_COLUMN), copy=False)
        filtered = filtered or any(select.args.get(c) for c in ("where", "limit", "offset", "distinct"))
        return roles, filtered


def _row_level() -> OutputRefused:
    return OutputRefused("the result is row-level (its rows are records, not aggregate groups) and this "
                         "project may only take aggregates out. Add GROUP BY … with COUNT(*), or ask the "
                         "steward for row-level access in the project's data-use agreement.")


def _refuse_cross_row_values(select: exp.Select) -> None:
    for projection in select.expressions:
        if any(_own(w, select) for w in projection.find_all(exp.Window)):
            raise OutputRefused("a window function over aggregated rows copies one group's value into another "
                                "row; compute shares and running totals from the checked result instead.")
        if any(_own(q, select) for q in projection.find_all(exp.Subquery, exp.Select) if q is not select):
            raise OutputRefused("a subquery in the SELECT list returns a value whose persons cannot be "
                                f"counted. {_REWRITE_ADVICE}")
    if select.args.get("qualify"):
        raise OutputRefused("QUALIFY filters rows on window values; filter in WHERE instead.")


# ------------------------------------------------------------ person ids ----

def _string_values(column: pa.ChunkedArray) -> pa.Array | None:
    values = column
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        values = pc.list_flatten(values)
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return None
    return pc.unique(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)


def _refuse_person_columns(con, result: pa.Table, views: dict[str, str]) -> None:
    """Refuse a result that holds person_ids of the project's tables in any column."""
    if not views or result.num_rows == 0:
        return
    persons = " UNION ".join(f'SELECT person_id FROM "{view}"' for view in sorted(set(views.values())))
    name = "__disclosure_values"
    for column_name, column in zip(result.column_names, result.columns):
        values = _string_values(column)
        if values is None or len(values) == 0:
            continue
        con.register(name, pa.table({"v": values.cast(pa.string())}))
        try:
            found = con.execute(f"SELECT count(*) FROM {name} WHERE v IN ({persons})").fetchall()[0][0]
        finally:
            con.unregister(name)
        if found:
            raise OutputRefused(f"column {column_name!r} holds {found} person_id(s) of the project's tables: "
                                "person-level results need row-level access. Count persons instead of "
                                "listing them.")


# ------------------------------------------------------------ differencing ----

def _join_conditions(select: exp.Select) -> list[exp.Expr]:
    """Take the filtering part of inner joins' ON out of ``select`` (kept: column equalities)."""
    moved = []
    for join in select.args.get("joins") or []:
        on = join.args.get("on")
        if on is None:
            continue
        keys: list[exp.Expr] = []
        extra: list[exp.Expr] = []
        for conjunct in _conjuncts(on):
            is_key = isinstance(conjunct, exp.EQ) and all(isinstance(s, exp.Column) for s in (conjunct.this,
                                                                                             conjunct.expression))
            (keys if is_key else extra).append(conjunct)
        if not extra:
            continue
        if join.side or (join.kind or "").upper() not in ("", "INNER", "CROSS"):
            raise OutputRefused(f"the {join.side or join.kind} JOIN filters with "
                                f"{extra[0].sql('duckdb')[:60]!r} in ON; filter in WHERE or in a subquery.")
        join.set("on", exp.and_(*keys) if keys else exp.true())
        moved += extra
    return moved


def _row_predicates(select: exp.Select) -> list[exp.Expression]:
    """Conditions evaluated per row in ``select``'s own select list (FILTER, CASE WHEN, count_if…).

    In an aggregate, only conditions inside aggregate functions count: a
    condition in a grouping key makes groups, whose small cells are suppressed.
    """
    grouped = _is_aggregate(select)
    having = select.args.get("having")
    found = []
    for projection in [*select.expressions, *([having.this] if having is not None else [])]:
        for node in projection.find_all(exp.Predicate, exp.Connector, exp.Not):
            if not _own(node, select) or node.find(exp.AggFunc, exp.Window):
                continue
            if grouped and node.find_ancestor(exp.AggFunc, exp.Filter) is None:
                continue
            parent = node.parent
            while isinstance(parent, exp.Paren):
                parent = parent.parent
            if not isinstance(parent, (exp.Predicate, exp.Connector, exp.Not)):
                found.append(node)
    return found


def _refuse_person_functions(tree: exp.Expr) -> None:
    """person_id may be selected, counted, grouped, joined or filtered on, and nothing else.

    A function of it in a select list (``sum(instr(person_id, 'x'))``) would
    single out a person without any condition to measure.
    """
    names = {"person_id"}
    changed = True
    while changed:  # an alias of a bare person column is a person column too
        changed = False
        for alias in tree.find_all(exp.Alias):
            if isinstance(alias.this, exp.Column) and alias.this.name in names and alias.alias not in names:
                names.add(alias.alias)
                changed = True
    for column in tree.find_all(exp.Column):
        if column.name not in names:
            continue
        parent = column.parent.parent if isinstance(column.parent, exp.Distinct) else column.parent
        if isinstance(parent, exp.Alias):
            parent = parent.parent
        having = column.find_ancestor(exp.Having)
        if having is not None:
            group = having.parent.args.get("group") if having.parent is not None else None
            if group is not None and any(isinstance(g, exp.Column) and g.name == "person_id"
                                         for g in group.expressions):
                continue  # rows grouped per person: the HAVING is measured like a WHERE
            raise OutputRefused("HAVING on person_id keeps or drops groups by who is in them; group per "
                                "person_id in a subquery, or filter in WHERE.")
        if isinstance(parent, (exp.Select, exp.Count, exp.ApproxDistinct, exp.Window, exp.Ordered)):
            continue
        if column.find_ancestor(exp.Where, exp.Join, exp.Group) is not None:
            continue
        raise OutputRefused(f"{column.sql('duckdb')} is used in {(parent or column).sql('duckdb')[:60]!r}: person_id may only "
                            "be selected, counted, grouped, joined or filtered on.")


def _refuse_differencing(con, tree: exp.Expr, project: Project, views: dict[str, str],
                         ctes: dict[str, exp.Expression]) -> list[str]:
    notes: list[str] = []
    with_clause = tree.args.get("with_")
    for select in list(tree.find_all(exp.Select)):
        measure = select.copy()
        for clause in ("where", "group", "having", "qualify", "order", "limit", "offset", "distinct", "with_"):
            measure.set(clause, None)
        where = select.args.get("where")
        conjuncts = _conjuncts(where.this if where else None) + _join_conditions(measure)
        predicates = _row_predicates(select)
        if conjuncts or predicates:
            try:
                persons = _Lineage(views, ctes).of_select(measure)
            except _Untraceable:
                persons = []  # a filter on aggregated rows: the groups it keeps are checked as cells
            if persons:
                _measure(con, measure, persons, conjuncts, predicates, project, with_clause, notes)
        # HAVING on rows grouped per person is a WHERE on persons.
        group, having = select.args.get("group"), select.args.get("having")
        keys = [g for g in (group.expressions if group is not None else [])
                if isinstance(g, exp.Column) and g.name == "person_id"]
        if having is not None and keys:
            grouped = select.copy()
            for clause in ("having", "qualify", "order", "limit", "offset", "distinct", "with_"):
                grouped.set(clause, None)
            _measure(con, grouped, keys, _conjuncts(having.this), [], project, with_clause, notes)
    return notes


def _measure(con, measure: exp.Select, persons: Sequence[exp.Expr], conjuncts: list[exp.Expr],
             predicates: Sequence[exp.Expr], project: Project, with_clause: exp.With | None,
             notes: list[str]) -> None:
    """Refuse when a condition evaluated on the rows of ``measure`` singles out fewer than min_cell_size persons."""
    import duckdb

    booleans: list[exp.Expr] = []

    def flag(condition: exp.Expr) -> exp.Expression:
        booleans.append(condition)
        return exp.column(f"__c{len(booleans) - 1}").is_(exp.true())

    # (condition, wider rows, narrower rows): persons in the first and not
    # in the second are the ones the condition singles out.
    comparisons: list[tuple[exp.Expr, list, list]] = []
    flags = [flag(c) for c in conjuncts]
    for j, condition in enumerate(conjuncts):
        others = flags[:j] + flags[j + 1:]
        comparisons.append((condition, [], [flags[j]]))
        comparisons.append((condition, others, flags))
        if isinstance(condition, exp.Or):
            disjuncts = [d.unnest() for d in condition.flatten()]
            disjunct_flags = [flag(d) for d in disjuncts]
            for k, disjunct in enumerate(disjuncts):
                rest = disjunct_flags[:k] + disjunct_flags[k + 1:]
                comparisons.append((disjunct, [disjunct_flags[k]], [exp.false()]))
                comparisons.append((disjunct, [*others, flags[j]], [*others, exp.or_(*rest)]))
    for predicate in predicates:
        flagged = flag(predicate)
        comparisons.append((predicate, [], [flagged]))
        comparisons.append((predicate, [flagged], [exp.false()]))

    measure.set("expressions", [exp.alias_(p.copy(), f"__p{i}") for i, p in enumerate(persons)]
                + [exp.alias_(c.copy(), f"__c{j}") for j, c in enumerate(booleans)])
    if with_clause is not None:
        measure.set("with_", with_clause.copy())

    def counted(i: int, filters: list) -> exp.Expression:
        count = exp.Count(this=exp.Distinct(expressions=[exp.column(f"__p{i}")]))
        return exp.Filter(this=count, expression=exp.Where(this=exp.and_(*filters))) if filters else count

    cells = [counted(i, rows) for i in range(len(persons)) for _, wider, narrower in comparisons
             for rows in (wider, narrower)]
    query = exp.select(*cells).from_(exp.Subquery(this=measure, alias=exp.TableAlias(this=exp.to_identifier("m"))))
    try:
        row = con.execute(query.sql("duckdb")).fetchall()[0]
    except duckdb.BinderException:
        notes.append("a correlated subquery's condition was measured within the query that holds it")
        return
    for n, (condition, _, _) in enumerate(comparisons * len(persons)):
        singled_out = row[2 * n] - row[2 * n + 1]
        if 0 < singled_out < project.min_cell_size:
            raise OutputRefused(
                f"the condition {condition.sql('duckdb')[:80]!r} singles out {singled_out} person(s) "
                f"(fewer than {project.min_cell_size}): compared with the same query without it, it "
                "would tell their values. Drop the condition or make it cover more persons.")


# ------------------------------------------------------------ suppression ----

def _hashable(value):
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _suppressed_rows(table: pa.Table, support: list, roles: list[str], threshold: int) -> tuple[list[bool], int]:
    """Primary then secondary suppression; the flags per row and how many rows were primary."""
    columns = [c.to_pylist() for c in table.columns]
    small = [s is None or s < threshold for s in support]
    primary = sum(small)
    keys = [j for j, role in enumerate(roles) if role == ROLE_KEY]
    dimensions: list[int | None] = list(keys) or [None]
    changed = True
    while changed:
        changed = False
        for dimension in dimensions:
            breakdowns: dict[tuple, list[int]] = defaultdict(list)
            for row in range(table.num_rows):
                breakdowns[tuple(_hashable(columns[j][row]) for j in keys if j != dimension)].append(row)
            for rows in breakdowns.values():
                hidden = [r for r in rows if small[r]]
                if len(rows) < 2 or len(hidden) != 1:
                    continue
                shown = [r for r in rows if not small[r]]
                detail = [r for r in shown if dimension is None or columns[dimension][r] is not None]
                pick = min(detail or shown, key=lambda r: (support[r] or 0, r))
                small[pick] = True
                changed = True
    return small, primary


def _round(column: pa.ChunkedArray, base: int) -> pa.ChunkedArray | pa.Array:
    if base <= 1 or not pa.types.is_integer(column.type):
        return column
    return pa.array([None if v is None else (v + base // 2) // base * base for v in column.to_pylist()],
                    type=column.type)


def check_output(con, sql: str, result: pa.Table, project: Project, views: dict[str, str]) -> CheckedOutput:
    """The result as it may leave the gateway, or :class:`OutputRefused` with the reason.

    ``con`` is the DuckDB connection on which the project's datasets are
    registered under ``views[dataset]``; ``sql`` is the checked query (table
    names already rewritten to the views) that produced ``result``. The
    returned table comes from re-running the query rewritten with its support
    column, so values and support come from one execution.
    """
    if project.row_level:
        return CheckedOutput(result, 0, ["row-level results allowed by the project's data-use agreement"])
    _refuse_person_columns(con, result, views)
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except SqlglotError as exc:
        raise OutputRefused(f"the query cannot be parsed for output checking: {exc}") from None
    with_clause = tree.args.get("with_")
    if with_clause is not None and with_clause.args.get("recursive"):
        raise OutputRefused("recursive CTEs cannot be traced to persons; write the query without RECURSIVE.")
    ctes = {cte.alias: cte.this for cte in (with_clause.expressions if with_clause is not None else [])}
    _refuse_person_functions(tree)
    notes = _refuse_differencing(con, tree, project, views, ctes)

    rewritten = tree.copy()
    roles, filtered = _Lineage(views, ctes, project.count_rounding).plan(rewritten)
    checked = con.sql(rewritten.sql("duckdb")).to_arrow_table()
    support = checked.column(checked.num_columns - 1).to_pylist()
    values = checked.select(list(range(checked.num_columns - 1)))
    if values.num_columns != len(roles) or values.num_columns != result.num_columns:
        raise OutputRefused("the result's columns could not be matched to the query's; nothing leaves unchecked. "
                            f"{_REWRITE_ADVICE}")
    values = values.rename_columns(result.column_names)
    _refuse_person_columns(con, values, views)

    small, primary = _suppressed_rows(values, support, roles, project.min_cell_size)
    cells = [j for j, role in enumerate(roles) if role != ROLE_KEY]
    suppressed = sum(small) * len(cells)
    if filtered:
        values = values.filter(pa.array([not s for s in small], type=pa.bool_()))
        if any(small):
            notes.append(f"{sum(small)} group(s) under {project.min_cell_size} persons removed: the query "
                         "filters on aggregate values")
    elif any(small):
        mask = pa.array(small)
        for j in cells:
            column = values.column(j)
            values = values.set_column(j, values.field(j), pc.if_else(mask, pa.scalar(None, column.type), column))
        notes.append(f"{primary} group(s) under {project.min_cell_size} persons suppressed, "
                     f"{sum(small) - primary} more so that they cannot be recomputed from totals")
    rounded = [j for j, role in enumerate(roles) if role == ROLE_COUNT and pa.types.is_integer(values.field(j).type)]
    for j in rounded:
        values = values.set_column(j, values.field(j), _round(values.column(j), project.count_rounding))
    if rounded and project.count_rounding > 1:
        notes.append(f"counts rounded to the nearest {project.count_rounding}")
    return CheckedOutput(values, suppressed, notes)


def _typed_in_csv(kind: pa.DataType) -> bool:
    """Types whose CSV text is a number, a boolean or a date: never read as a formula."""
    return (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
            or pa.types.is_boolean(kind) or pa.types.is_temporal(kind) or pa.types.is_null(kind))


def _as_text(column) -> pa.ChunkedArray:
    """The text a CSV gets for ``column``: strings as they are, enums decoded, bytes, lists and structs rendered."""
    import json

    kind = column.type
    if pa.types.is_dictionary(kind):
        return _as_text(pc.cast(column, kind.value_type))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        values = [None if v is None else v.decode("utf-8", errors="backslashreplace") for v in column.to_pylist()]
    else:  # lists, structs, maps, unions: their JSON text
        values = [None if v is None else json.dumps(v, default=str, ensure_ascii=False) for v in column.to_pylist()]
    return pa.chunked_array([pa.array(values, pa.string())])


def neutralise_csv(table: pa.Table) -> pa.Table:
    """Every cell whose CSV text a spreadsheet would read as a formula gets a leading apostrophe.

    Whatever the column's type: enums, bytes, lists and structs are rendered
    as text first (the CSV writer would write their text anyway, or fail).
    """
    columns, fields = [], []
    for name, column in zip(table.column_names, table.columns):
        if not _typed_in_csv(column.type):
            column = _as_text(column)
            risky = pc.starts_with(column, FORMULA_PREFIXES[0])
            for prefix in FORMULA_PREFIXES[1:]:
                risky = pc.or_(risky, pc.starts_with(column, prefix))
            column = pc.if_else(risky, pc.binary_join_element_wise("'", column, ""), column)
        columns.append(column)
        fields.append(pa.field(name, column.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))
