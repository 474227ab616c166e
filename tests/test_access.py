"""Researcher access: membership, validity and SQL checks, two engines, audit of every call, exports."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from jobs.access import (OUTCOME_ALLOWED, OUTCOME_REFUSED, QueryRefused, check_sql, export, query, read_audit)
from jobs.lake import Lake
from jobs.policy import AccessDenied

TODAY = dt.date(2026, 6, 1)
PROJECT = "diabetes_outcomes"
MEMBER = "alice.tremblay"


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    lake = Lake(str(tmp_path_factory.mktemp("access") / "lake"))
    encounters = [(f"v{i}", f"p{i % 15}", "chu_laurentides", dt.date(2026, 1, 1), dt.date(2026, 1, 1),
                   "inpatient" if i < 12 else "emergency") for i in range(15)]
    spark.createDataFrame(encounters, "visit_occurrence_id string, person_id string, establishment_id string, "
                          "visit_start_date date, visit_end_date date, visit_source_value string") \
        .write.format("delta").save(lake.project(PROJECT, "encounter"))
    spark.createDataFrame([("p1", "female", 1970, "H2X")],
                          "person_id string, gender_source_value string, year_of_birth int, postal_prefix string") \
        .write.format("delta").save(lake.project(PROJECT, "patient"))
    spark.createDataFrame([("x1", "p1", "E11.9")], "person_id string, establishment_id string, c string") \
        .write.format("delta").save(lake.silver("diagnosis"))
    spark.createDataFrame([("q1", "female", 1970)], "person_id string, gender_source_value string, year_of_birth int") \
        .write.format("delta").save(lake.project("oncology_cohort", "patient"))
    return lake


def audit_rows(lake):
    return sorted(read_audit(lake).to_pylist(), key=lambda r: r["occurred_at"])


def test_member_queries_with_spark_and_duckdb_are_audited(spark, lake, consortium):
    sql = "SELECT e.visit_source_value, count(*) AS n FROM encounter e JOIN project.patient p USING (person_id) GROUP BY 1"
    df = query(spark, lake, consortium, PROJECT, MEMBER, sql, engine="spark", today=TODAY)
    assert [tuple(r) for r in df.collect()] == [("inpatient", 1)]
    table = query(None, lake, consortium, PROJECT, MEMBER, "SELECT * FROM encounter", engine="duckdb", today=TODAY)
    assert isinstance(table, pa.Table) and table.num_rows == 15
    allowed = [r for r in audit_rows(lake) if r["outcome"] == OUTCOME_ALLOWED and r["action"] == "query"]
    assert [(r["engine"], r["rows_returned"]) for r in allowed][-2:] == [("spark", 1), ("duckdb", 15)]
    assert all(len(r["sql_sha256"]) == 64 and r["user"] == MEMBER for r in allowed)


REFUSALS = [
    (MEMBER, PROJECT, "SELECT * FROM diagnosis", "not published yet"),
    (MEMBER, PROJECT, "SELECT * FROM silver.diagnosis", "not one of project"),   # silver
    (MEMBER, PROJECT, "SELECT * FROM oncology_cohort.patient", "not one of project"),
    (MEMBER, PROJECT, "SELECT * FROM medication", "not one of project"),
    (MEMBER, PROJECT, "DROP TABLE encounter", "only SELECT"),
    (MEMBER, PROJECT, "INSERT INTO encounter SELECT * FROM encounter", "only SELECT"),
    (MEMBER, PROJECT, "SELECT * FROM encounter; DELETE FROM encounter", "exactly one statement"),
    (MEMBER, PROJECT, "SELECT * INTO t FROM encounter", "INTO"),
    (MEMBER, PROJECT, "SELECT * FROM encounter VERSION AS OF 0", "time travel"),
    (MEMBER, PROJECT, "SELECT * FROM read_parquet('/etc/x.parquet')", "not allowed"),
    (MEMBER, PROJECT, "SELECT reflect('java.lang.System', 'exit', 0) FROM encounter", "not allowed"),
    (MEMBER, PROJECT, "SELECT * FROM '/tmp/lake/silver/patient'", "not one of project"),
    ("chloe.roy", PROJECT, "SELECT * FROM encounter", "not a member"),
    ("mallory", "no_such_project", "SELECT * FROM encounter", "unknown project"),
]


@pytest.mark.parametrize("engine", ["spark", "duckdb"])
def test_refusals_raise_and_are_audited(spark, lake, consortium, engine):
    before = len(audit_rows(lake))
    for user, project, sql, reason in REFUSALS:
        with pytest.raises(AccessDenied, match=reason):
            query(spark, lake, consortium, project, user, sql, engine=engine, today=TODAY)
    with pytest.raises(QueryRefused, match="not one of project"):
        query(spark, lake, consortium, PROJECT, MEMBER, "SELECT * FROM delta.`/x`", engine="spark", today=TODAY)
    with pytest.raises(AccessDenied, match="not valid on"):
        query(spark, lake, consortium, PROJECT, MEMBER, "SELECT * FROM encounter", engine=engine,
              today=dt.date(2030, 1, 1))
    new = audit_rows(lake)[before:]
    assert len(new) == len(REFUSALS) + 2
    assert all(r["outcome"] == OUTCOME_REFUSED and r["reason"] and r["rows_returned"] is None for r in new)


def test_export_suppresses_small_cells(spark, lake, consortium, tmp_path):
    sql = "SELECT visit_source_value, count(*) AS n, count(DISTINCT person_id) AS persons FROM encounter GROUP BY 1"
    out = export(None, lake, consortium, PROJECT, MEMBER, sql, str(tmp_path / "counts.csv"), fmt="csv",
                 engine="duckdb", today=TODAY)
    rows = {r["visit_source_value"]: r for r in pacsv.read_csv(out.destination).to_pylist()}
    assert rows["inpatient"]["n"] == 12 and rows["emergency"]["n"] is None and rows["emergency"]["persons"] is None
    assert out.suppressed_cells == 1
    spark_out = export(spark, lake, consortium, PROJECT, MEMBER, sql, str(tmp_path / "counts_parquet"),
                       fmt="parquet", engine="spark", today=TODAY)
    got = {r.visit_source_value: r.n for r in spark.read.parquet(spark_out.destination).collect()}
    assert got == {"inpatient": 12, "emergency": None}
    with pytest.raises(QueryRefused, match="needs a COUNT"):
        export(None, lake, consortium, PROJECT, MEMBER,
               "SELECT visit_source_value, max(visit_start_date) AS last FROM encounter GROUP BY 1",
               str(tmp_path / "x.csv"), engine="duckdb", today=TODAY)
    exports = [r for r in audit_rows(lake) if r["action"] == "export"]
    assert [r["outcome"] for r in exports][-3:] == [OUTCOME_ALLOWED, OUTCOME_ALLOWED, OUTCOME_REFUSED]


def test_audit_table_is_append_only(lake):
    from deltalake import DeltaTable

    table = DeltaTable(lake.ops("access_audit"))
    assert table.metadata().configuration.get("delta.appendOnly") == "true"
    with pytest.raises(Exception):
        table.delete("outcome = 'refused'")


def test_cte_names_cannot_reach_the_catalog(consortium):
    project = consortium.projects[PROJECT]
    views = {d: f"v_{d}" for d in project.datasets}
    with pytest.raises(QueryRefused):
        check_sql("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) y JOIN x ON true", project, "spark", views)
    checked = check_sql("WITH encounter AS (SELECT * FROM encounter WHERE 1 = 1) SELECT * FROM encounter",
                        project, "spark", views)
    assert "v_encounter" in checked.sql
