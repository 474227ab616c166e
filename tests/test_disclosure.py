"""Output checking (jobs.privacy.disclosure) on tiny tables in an in-memory DuckDB, as the gateway registers them."""

from __future__ import annotations

import datetime as dt

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from jobs.core.config import Project
from jobs.privacy.disclosure import OutputRefused, check_output, neutralise_csv
from jobs.privacy.policy import AccessDenied

VIEWS = {"patient": "q_patient", "diagnosis": "q_diagnosis"}
PERSONS = [f"p{i:02d}" for i in range(1, 61)]
# code -> persons (numbers): E11 25 persons, I10 31, C50 3 (a small cell), J45 12.
CODES = {"E11": range(1, 26), "I10": range(20, 51), "C50": range(51, 54), "J45": range(49, 61)}


def _year(n: int) -> int:
    # p01 and p60 are the only persons born in 1930 and 1931; the others share
    # years three by three.
    return {1: 1930, 60: 1931}.get(n, 1950 + n % 19)


@pytest.fixture(scope="module")
def con():
    connection = duckdb.connect(config={"enable_external_access": False})
    patient = pa.table({
        "person_id": PERSONS,
        "gender_source_value": ["F" if i <= 30 else "M" for i in range(1, 61)],
        "year_of_birth": [_year(i) for i in range(1, 61)],
    })
    rows = [(f"p{n:02d}", code) for code, numbers in CODES.items() for n in numbers]
    diagnosis = pa.table({"person_id": [r[0] for r in rows], "condition_source_value": [r[1] for r in rows]})
    connection.register("q_patient", ds.dataset(patient))
    connection.register("q_diagnosis", ds.dataset(diagnosis))
    connection.execute("SET lock_configuration = true")
    yield connection
    connection.close()


def _project(**overrides) -> Project:
    fields = dict(
        id="diabetes", title="Diabetes", purpose="research_general", ethics_approval="CER-1",
        valid_from=dt.date(2020, 1, 1), valid_until=dt.date(2030, 1, 1), members=["alice"],
        establishments=["chu_a"],
        datasets={"patient": ["person_id", "gender_source_value", "year_of_birth"],
                  "diagnosis": ["person_id", "condition_source_value"]},
    )
    return Project(**(fields | overrides))


def _check(con, sql: str, project: Project | None = None):
    result = con.sql(sql).to_arrow_table()
    return check_output(con, sql, result, project or _project(), VIEWS)


def _rows(checked) -> dict:
    return {tuple(r[:-1]): r[-1] for r in zip(*[c.to_pylist() for c in checked.table.columns])}


# ------------------------------------------------------------ small cells ----

def test_counts_are_rounded_and_small_cell_suppressed_with_the_next_smallest(con):
    checked = _check(con, "SELECT condition_source_value AS code, count(DISTINCT person_id) AS n "
                          "FROM q_diagnosis GROUP BY code")
    # C50 (3 persons) is under 11; J45 (12) is the next smallest of the breakdown,
    # suppressed so that C50 cannot be recomputed from the total.
    assert _rows(checked) == {("E11",): 25, ("I10",): 30, ("C50",): None, ("J45",): None}
    assert checked.suppressed_cells == 2


def test_a_breakdown_with_two_small_cells_needs_no_secondary_suppression(con):
    checked = _check(con, "SELECT condition_source_value, count(*) AS n, avg(year_of_birth) > 0 AS m "
                          "FROM q_diagnosis d JOIN q_patient p ON p.person_id = d.person_id "
                          "WHERE condition_source_value IN ('C50', 'J45', 'E11', 'I10') "
                          "AND d.person_id NOT IN ('x') GROUP BY 1")
    rows = {r[0]: list(r[1:]) for r in zip(*[c.to_pylist() for c in checked.table.columns])}
    assert rows["C50"] == [None, None]  # every aggregate cell of the row
    assert rows["E11"] == [25, True]


def test_aggregate_without_count_still_suppressed_on_its_persons(con):
    checked = _check(con, "SELECT gender_source_value, max(year_of_birth) AS y FROM q_patient p "
                          "JOIN q_diagnosis d ON d.person_id = p.person_id "
                          "WHERE d.condition_source_value = 'C50' GROUP BY 1")
    assert checked.table.column("y").to_pylist() == [None]


def test_rollup_total_cannot_give_back_a_suppressed_cell(con):
    sql = ("SELECT p.gender_source_value AS sex, d.condition_source_value AS code, count(DISTINCT p.person_id) AS n "
           "FROM q_patient p JOIN q_diagnosis d ON d.person_id = p.person_id "
           "GROUP BY ROLLUP (sex, code)")
    rows = _rows(_check(con, sql))
    # M x C50 (3 persons) is primary; within sex M, the next smallest detail cell goes too.
    assert rows[("M", "C50")] is None
    assert sum(1 for (sex, code), n in rows.items() if sex == "M" and code is not None and n is None) >= 2
    assert rows[(None, None)] == 60
    # No breakdown is left with exactly one hidden cell.
    for sex in ("F", "M"):
        hidden = [n for (s, c), n in rows.items() if s == sex and c is not None and n is None]
        assert len(hidden) != 1


def test_list_valued_keys_are_suppressed_too(con):
    checked = _check(con, "SELECT [gender_source_value] AS sexes, count(*) AS n FROM q_patient p "
                          "JOIN q_diagnosis d ON d.person_id = p.person_id "
                          "WHERE d.condition_source_value IN ('E11', 'J45') GROUP BY 1")
    # F: 25 persons (E11), M: 12 (J45) — no small cell, nothing hidden.
    assert sorted(zip(checked.table.column("sexes").to_pylist(), checked.table.column("n").to_pylist())) == [
        (["F"], 25), (["M"], 10)]


def test_union_of_totals_is_one_breakdown(con):
    checked = _check(con, "SELECT 'all' AS k, count(DISTINCT person_id) AS n FROM q_diagnosis "
                          "UNION ALL SELECT 'c50', count(DISTINCT person_id) FROM q_diagnosis "
                          "WHERE condition_source_value = 'C50'")
    # 60 - c50 would give the persons without C50 back, so both are hidden.
    assert checked.table.column("n").to_pylist() == [None, None]


# ------------------------------------------------------------ aggregates hidden in the query's shape ----

def test_aggregate_inside_a_cte_is_checked(con):
    checked = _check(con, "WITH agg AS (SELECT condition_source_value AS code, count(*) AS n FROM q_diagnosis "
                          "GROUP BY code) SELECT * FROM agg ORDER BY code")
    assert checked.table.column_names == ["code", "n"]
    assert dict(zip(*[c.to_pylist() for c in checked.table.columns]))["C50"] is None


def test_filter_on_hidden_counts_removes_the_rows(con):
    checked = _check(con, "SELECT code FROM (SELECT condition_source_value AS code, count(*) AS n "
                          "FROM q_diagnosis GROUP BY code) t WHERE n = 3")
    assert checked.table.num_rows == 0  # presence of C50 would tell n = 3


def test_having_on_small_counts_reveals_nothing(con):
    checked = _check(con, "SELECT condition_source_value FROM q_diagnosis GROUP BY 1 HAVING count(*) < 11")
    assert checked.table.num_rows == 0


def test_window_over_rows_is_row_level(con):
    with pytest.raises(OutputRefused, match="window|row-level"):
        _check(con, "SELECT condition_source_value, count(*) OVER (PARTITION BY condition_source_value) "
                    "FROM q_diagnosis")


def test_window_over_aggregates_is_refused(con):
    with pytest.raises(OutputRefused, match="window"):
        _check(con, "SELECT condition_source_value, count(*) AS n, lag(count(*)) OVER (ORDER BY 1) "
                    "FROM q_diagnosis GROUP BY 1")


def test_union_with_a_row_level_branch_is_refused(con):
    with pytest.raises(OutputRefused):
        _check(con, "SELECT condition_source_value, count(*) FROM q_diagnosis GROUP BY 1 "
                    "UNION ALL SELECT condition_source_value, 1 FROM q_diagnosis")


def test_aggregate_over_an_aggregated_subquery_is_refused(con):
    with pytest.raises(OutputRefused, match="person_id"):
        _check(con, "SELECT sum(n) FROM (SELECT condition_source_value, count(*) AS n FROM q_diagnosis GROUP BY 1)")


def test_per_person_subquery_and_cohort_cte_are_traced(con):
    checked = _check(con, "SELECT n, count(*) AS persons FROM (SELECT person_id, count(*) AS n FROM q_diagnosis "
                          "GROUP BY person_id) GROUP BY n ORDER BY n")
    # 49 persons with one code, 11 with two: rounded to 50 and 10, none under 11 persons.
    assert dict(zip(*[c.to_pylist() for c in checked.table.columns])) == {1: 50, 2: 10}
    cohort = _check(con, "WITH cohort AS (SELECT DISTINCT person_id FROM q_diagnosis "
                         "WHERE condition_source_value = 'E11') "
                         "SELECT gender_source_value, count(*) AS n FROM q_patient p "
                         "JOIN cohort c ON c.person_id = p.person_id GROUP BY 1")
    assert _rows(cohort) == {("F",): 25}


def test_aggregates_listing_records_are_refused(con):
    with pytest.raises(OutputRefused, match="person_id may only"):
        _check(con, "SELECT condition_source_value, string_agg(person_id, ',') FROM q_diagnosis GROUP BY 1")
    with pytest.raises(OutputRefused, match="record's own value"):
        _check(con, "SELECT gender_source_value, list(year_of_birth) FROM q_patient GROUP BY 1")


# ------------------------------------------------------------ row-level ----

def test_row_level_result_refused_without_row_level_access(con):
    with pytest.raises(OutputRefused, match="row-level|person_id"):
        _check(con, "SELECT person_id, condition_source_value FROM q_diagnosis")


def test_person_ids_in_an_aggregate_result_are_refused(con):
    with pytest.raises(OutputRefused, match="person_id"):
        _check(con, "SELECT min(person_id), count(*) FROM q_diagnosis GROUP BY condition_source_value")


def test_refusal_is_an_access_denial(con):
    with pytest.raises(AccessDenied):
        _check(con, "SELECT year_of_birth FROM q_patient")


def test_row_level_result_allowed_when_the_project_declares_it(con):
    project = _project(row_level=True)
    checked = _check(con, "SELECT person_id, condition_source_value FROM q_diagnosis", project)
    assert checked.table.num_rows == sum(len(v) for v in CODES.values())
    assert checked.suppressed_cells == 0


# ------------------------------------------------------------ differencing ----

def _count(con, condition: str) -> int | None:
    return _check(con, f"SELECT count(DISTINCT person_id) AS n FROM q_diagnosis WHERE {condition}").table[0][0].as_py()


@pytest.mark.parametrize("exclusion", [
    "person_id <> '{p}'",
    "person_id NOT IN ('{p}')",
    "NOT (person_id = '{p}' OR person_id IS NULL)",
    "person_id NOT IN (SELECT person_id FROM q_patient WHERE person_id = '{p}')",
])
def test_differencing_on_one_person_is_refused_whatever_their_value(con, exclusion):
    assert _count(con, "condition_source_value = 'E11'") == 25
    # p05 has E11, p40 has not: both exclusions are refused alike, so neither
    # the count nor the refusal tells p05's or p40's diagnosis.
    for person in ("p05", "p40"):
        with pytest.raises(OutputRefused, match="singles out 1 person"):
            _count(con, "condition_source_value = 'E11' AND " + exclusion.format(p=person))


def test_differencing_on_another_unique_attribute_is_refused(con):
    for year in (1930, 1931):  # p01 (E11) and p60 (no E11) are unique on their year of birth
        with pytest.raises(OutputRefused, match="singles out 1 person"):
            _check(con, "SELECT count(*) FROM q_diagnosis d JOIN q_patient p ON p.person_id = d.person_id "
                        f"WHERE d.condition_source_value = 'E11' AND p.year_of_birth <> {year}")


def test_differencing_hidden_in_a_cte_or_a_join_is_refused(con):
    with pytest.raises(OutputRefused, match="singles out"):
        _check(con, "WITH d AS (SELECT * FROM q_diagnosis WHERE person_id <> 'p05') "
                    "SELECT count(*) FROM d WHERE condition_source_value = 'E11'")
    with pytest.raises(OutputRefused, match="singles out"):
        _check(con, "SELECT count(*) FROM q_diagnosis d JOIN q_patient p "
                    "ON p.person_id = d.person_id AND p.person_id <> 'p05' "
                    "WHERE d.condition_source_value = 'E11'")


def test_having_on_rows_grouped_per_person_is_measured_like_where(con):
    with pytest.raises(OutputRefused, match="singles out 1 person"):
        _check(con, "SELECT count(*) FROM (SELECT person_id FROM q_diagnosis GROUP BY person_id "
                    "HAVING person_id <> 'p05') t")
    # A broad condition on each person's rows passes: 11 persons have two codes.
    checked = _check(con, "SELECT count(*) AS n FROM (SELECT person_id FROM q_diagnosis GROUP BY person_id "
                          "HAVING count(*) > 1) t")
    assert checked.table.column("n").to_pylist() == [10]


@pytest.mark.parametrize("having", [
    "count(*) FILTER (WHERE person_id = 'p05') = 0",
    "sum(CASE WHEN year_of_birth = 1930 THEN 1 ELSE 0 END) = 0",
])
def test_having_cannot_keep_groups_by_who_is_in_them(con, having):
    # Large groups shown or not as one person is in them would tell that person's diagnoses.
    with pytest.raises(OutputRefused, match="HAVING on person_id|singles out 1 person"):
        _check(con, "SELECT condition_source_value, count(*) FROM q_diagnosis d "
                    f"JOIN q_patient USING (person_id) GROUP BY 1 HAVING {having}")


def test_excluding_several_but_fewer_than_the_minimum_is_refused(con):
    with pytest.raises(OutputRefused, match="singles out 3 person"):
        _count(con, "condition_source_value = 'E11' AND person_id NOT IN ('p01', 'p02', 'p03')")


def test_adding_one_person_with_or_is_refused(con):
    with pytest.raises(OutputRefused, match="singles out 1 person"):
        _count(con, "condition_source_value = 'E11' OR person_id = 'p40'")


@pytest.mark.parametrize("aggregate", [
    "count(*) FILTER (WHERE d.person_id <> 'p05')",
    "count_if(d.person_id <> 'p05')",
    "sum(CASE WHEN year_of_birth = 1930 THEN 1 ELSE 0 END)",
])
def test_conditional_aggregates_are_measured_like_where(con, aggregate):
    # count_if's comparison of person_id is refused on its own (not a filter).
    with pytest.raises(OutputRefused, match="singles out 1 person|person_id may only"):
        _check(con, f"SELECT d.condition_source_value, {aggregate} FROM q_diagnosis d "
                    "JOIN q_patient p ON p.person_id = d.person_id GROUP BY 1")


def test_a_condition_in_a_grouping_key_makes_groups_that_are_suppressed(con):
    checked = _check(con, "SELECT p.year_of_birth = 1930 AS born_1930, count(*) AS n FROM q_diagnosis d "
                          "JOIN q_patient p ON p.person_id = d.person_id GROUP BY 1")
    assert set(checked.table.column("n").to_pylist()) == {None}  # the one person, and the rest by subtraction


def test_functions_of_person_id_are_refused(con):
    with pytest.raises(OutputRefused, match="person_id may only"):
        _check(con, "SELECT condition_source_value, sum(instr(person_id, 'p05')) FROM q_diagnosis GROUP BY 1")


def test_a_broad_condition_is_allowed(con):
    assert _count(con, "condition_source_value = 'I10' AND person_id > 'p00'") == 30


# ------------------------------------------------------------ CSV ----

def test_csv_formulas_are_neutralised():
    table = pa.table({"a": ["=HYPERLINK(\"x\")", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "plain", None],
                      "n": list(range(8))})
    out = neutralise_csv(table)
    assert out.column("a").to_pylist() == ["'=HYPERLINK(\"x\")", "'+1", "'-2", "'@SUM(A1)", "'\tx", "'\rx",
                                           "plain", None]
    assert out.column("n").to_pylist() == list(range(8))
    assert out.schema == table.schema


def test_smallest_group_by_order_and_limit_is_not_shown(con):
    checked = _check(con, "SELECT condition_source_value, count(*) AS n FROM q_diagnosis "
                          "GROUP BY ALL ORDER BY n LIMIT 1")
    assert checked.table.num_rows == 0


def test_arithmetic_on_a_count_does_not_undo_rounding(con):
    checked = _check(con, "SELECT condition_source_value AS code, count(*) + 0 AS plus_zero, "
                          "count(*) * 1.0 AS scaled FROM q_diagnosis GROUP BY 1")
    rows = {r[0]: r[1:] for r in zip(*[c.to_pylist() for c in checked.table.columns])}
    assert rows["I10"] == (30, 30.0)  # 31 diagnoses
    wrapped = _check(con, "SELECT code, n + 0 AS m FROM (SELECT condition_source_value AS code, count(*) AS n "
                          "FROM q_diagnosis GROUP BY 1) t")
    assert dict(zip(*[c.to_pylist() for c in wrapped.table.columns]))["I10"] == 30
