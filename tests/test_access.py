"""Researcher access engine: membership, validity and SQL checks, DuckDB only, audit of every call, exports."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from jobs.research.access import (OUTCOME_ALLOWED, OUTCOME_REFUSED, QueryRefused, check_sql, export, query, read_audit)
from jobs.core.config import load_consortium
from jobs.core.lake import Lake
from jobs.privacy.policy import AccessDenied
from tests.conftest import CONFIG_DIR
from tests.gateway_helpers import make_config

TODAY = dt.date(2026, 6, 1)
PROJECT = "diabetes_outcomes"
MEMBER = "alice.tremblay"


@pytest.fixture(scope="module")
def row_level(tmp_path_factory):
    """The shipped configuration with ``diabetes_outcomes`` allowed row-level results."""
    return load_consortium(make_config(CONFIG_DIR, tmp_path_factory.mktemp("access-config") / "config"))


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    from deltalake import write_deltalake

    lake = Lake(str(tmp_path_factory.mktemp("access") / "lake"))
    write_deltalake(lake.project(PROJECT, "encounter"), pa.table({
        "visit_occurrence_id": [f"v{i}" for i in range(15)], "person_id": [f"p{i % 15}" for i in range(15)],
        "establishment_id": ["chu_laurentides"] * 15, "visit_start_date": [dt.date(2026, 1, 1)] * 15,
        "visit_end_date": [dt.date(2026, 1, 1)] * 15,
        "visit_source_value": ["=HYPERLINK(\"http://x\")" if i == 0 else "inpatient" if i < 12 else "emergency"
                               for i in range(15)]}))
    write_deltalake(lake.project(PROJECT, "patient"), pa.table({
        "person_id": ["p1"], "gender_source_value": ["female"], "year_of_birth": [1970], "postal_prefix": ["H2X"]}))
    write_deltalake(lake.silver("diagnosis"), pa.table({"person_id": ["x1"], "c": ["E11.9"]}))
    write_deltalake(lake.project("oncology_cohort", "patient"), pa.table({"person_id": ["q1"]}))
    return lake


def audit_rows(lake):
    return read_audit(lake).to_pylist()


def test_member_query_runs_in_duckdb_and_is_audited_with_its_sql(lake, row_level):
    sql = "SELECT e.visit_source_value, p.year_of_birth FROM encounter e JOIN project.patient p USING (person_id)"
    table = query(None, lake, row_level, PROJECT, MEMBER, sql, today=TODAY)
    assert isinstance(table, pa.Table) and table.to_pylist() == [{"visit_source_value": "inpatient",
                                                                  "year_of_birth": 1970}]
    last = audit_rows(lake)[-1]
    assert (last["outcome"], last["engine"], last["rows_returned"], last["sql"]) == (OUTCOME_ALLOWED, "duckdb", 1, sql)
    assert len(last["sql_sha256"]) == 64 and last["user"] == MEMBER and last["purpose"] == "research_general"


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


def test_refusals_raise_and_are_audited(lake, row_level):
    before = len(audit_rows(lake))
    for user, project, sql, reason in REFUSALS:
        with pytest.raises(AccessDenied, match=reason):
            query(None, lake, row_level, project, user, sql, today=TODAY)
    with pytest.raises(AccessDenied, match="not valid on"):
        query(None, lake, row_level, PROJECT, MEMBER, "SELECT * FROM encounter", today=dt.date(2030, 1, 1))
    with pytest.raises(QueryRefused, match="never in Spark"):
        query(None, lake, row_level, PROJECT, MEMBER, "SELECT * FROM encounter", engine="spark", today=TODAY)
    new = audit_rows(lake)[before:]
    assert len(new) == len(REFUSALS) + 2
    assert all(r["outcome"] == OUTCOME_REFUSED and r["reason"] and r["rows_returned"] is None for r in new)


def test_aggregate_only_project_refuses_row_level_results(lake, consortium):
    with pytest.raises(AccessDenied):
        query(None, lake, consortium, PROJECT, MEMBER, "SELECT person_id FROM encounter", today=TODAY)
    assert audit_rows(lake)[-1]["outcome"] == OUTCOME_REFUSED


def test_csv_export_neutralises_formulas(lake, row_level, tmp_path):
    out = export(lake, row_level, PROJECT, MEMBER, "SELECT visit_occurrence_id, visit_source_value FROM encounter",
                 str(tmp_path / "rows.csv"), fmt="csv", today=TODAY)
    values = [r["visit_source_value"] for r in pacsv.read_csv(out.destination).to_pylist()]
    assert out.rows == 15 and "'=HYPERLINK(\"http://x\")" in values and not any(v.startswith("=") for v in values)
    assert audit_rows(lake)[-1]["action"] == "export"


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
        check_sql("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) y JOIN x ON true", project, "duckdb", views)
    checked = check_sql("WITH encounter AS (SELECT * FROM encounter WHERE 1 = 1) SELECT * FROM encounter",
                        project, "duckdb", views)
    assert "v_encounter" in checked.sql


def test_locked_connection_holds_even_without_the_sql_check():
    import duckdb

    from jobs.research.access import Limits, locked_connection

    con = locked_connection(Limits(memory_limit="256MB", threads=1))
    for sql in ("SELECT * FROM read_csv('/etc/passwd')", "SET enable_external_access = true",
                "SET memory_limit = '64GB'", "INSTALL httpfs", "ATTACH '/tmp/x.duckdb' AS x",
                "COPY (SELECT 1) TO '/tmp/out.csv'"):
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    assert con.sql("SELECT current_setting('threads') AS t").fetchall() == [(1,)]
