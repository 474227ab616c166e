"""Delta tables keep statistics of ids, dates and numbers only: no text of a coded field in a commit log."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from jobs.core.schemas import staged_schema
from jobs.core.arrow_tables import open_delta
from jobs.core.tables import (NO_COMMIT, STATS_COLUMNS, create_table, ensure_table, files_that_may_hold, replace_rows,
                              stats_columns, table_properties, written_rows)

NAME = "Éloïse Tremblay, 12 rue des Érables"


def test_a_name_in_a_coded_field_never_reaches_the_statistics_of_a_commit_log(spark, tmp_path):
    path = str(tmp_path / "staged" / "encounter")
    schema = staged_schema("encounter")
    ensure_table(spark, path, schema, partition_by=("establishment_id",))
    assert table_properties(spark, path)[STATS_COLUMNS] == ",".join(stats_columns(schema, ("establishment_id",)))
    row = {f.name: None for f in schema.fields} | {
        "visit_occurrence_id": "v-key-1", "person_id": "p-pseudonym-1", "establishment_id": "chu_laurentides",
        "visit_start_date": dt.date(2026, 1, 2), "visit_source_value": "Jean Gagnon",
        "care_site_source_value": NAME, "record_action": "upsert", "_parse_errors": [],
        "_source_file": "b1#0", "_batch_id": "b1", "_extracted_at": dt.datetime(2026, 1, 5)}
    spark.createDataFrame([row], schema).write.format("delta").mode("append").save(path)

    commits = "".join(p.read_text(encoding="utf-8") for p in sorted(Path(path, "_delta_log").glob("*.json")))
    assert "minValues" in commits and "p-pseudonym-1" in commits  # ids still serve data skipping
    for text in ("Tremblay", "Gagnon", "rue des"):
        assert text not in commits


def test_only_ids_dates_and_numbers_outside_the_partition_columns_are_kept():
    kept = stats_columns(staged_schema("lab_result"), ("establishment_id",))
    assert {"measurement_id", "person_id", "measurement_date", "value_as_number"} <= set(kept)
    assert not {"establishment_id", "unit_source_value", "value_source_value", "measurement_source_value",
                "_source_file", "record_action"} & set(kept)


def test_silver_tables_keep_statistics_of_ids_dates_and_numbers_only(spark, tmp_path):
    from jobs.stages.land import ensure_silver_table
    from jobs.core.lake import Lake
    from jobs.core.schemas import SILVER_SCHEMAS

    lake = Lake(str(tmp_path / "lake"))
    ensure_silver_table(spark, lake, "encounter", "fingerprint")
    kept = table_properties(spark, lake.silver("encounter"))[STATS_COLUMNS].split(",")
    assert kept == stats_columns(SILVER_SCHEMAS["encounter"], ("establishment_id",))
    assert "care_site_source_value" not in kept and "visit_source_value" not in kept and "person_id" in kept


def test_a_silver_table_made_before_a_column_joined_the_schema_gains_it_with_its_comment(spark, tmp_path):
    """A lake from before the condition end date: silver lacks the column; the next land adds it (null
    for the rows it held), with its comment and without statistics, and a row carrying it lands."""
    from pyspark.sql.types import StructType

    from jobs.core.lake import Lake
    from jobs.core.schemas import SILVER_SCHEMAS
    from jobs.stages.land import column_comment, ensure_silver_table

    lake = Lake(str(tmp_path / "lake"))
    path = lake.silver("diagnosis")
    full = SILVER_SCHEMAS["diagnosis"]
    old = StructType([f for f in full.fields if f.name != "condition_end_date"])
    ensure_table(spark, path, old, partition_by=("establishment_id",))
    ensure_silver_table(spark, lake, "diagnosis", "fingerprint")
    fields = {f.name: f for f in spark.read.format("delta").load(path).schema.fields}
    assert fields["condition_end_date"].dataType == full["condition_end_date"].dataType
    described = {r.col_name: r.comment for r in spark.sql(f"DESCRIBE TABLE delta.`{path}`").collect()}
    assert described["condition_end_date"] == column_comment("diagnosis", "condition_end_date")
    assert "condition_end_date" not in table_properties(spark, path).get(STATS_COLUMNS, "")
    row = {f.name: None for f in full.fields} | {
        "condition_occurrence_id": "c1", "person_id": "p1", "establishment_id": "e1", "_batch_id": "b1",
        "_extracted_at": dt.datetime(2026, 1, 5), "condition_end_date": dt.date(2026, 1, 4)}
    spark.createDataFrame([row], full).write.format("delta").mode("append").save(path)
    assert spark.read.format("delta").load(path).first().condition_end_date == dt.date(2026, 1, 4)


def test_a_table_made_ready_once_is_not_looked_at_again_and_another_key_is_refused(spark, tmp_path):
    """``ready_table`` creates the table with the key's fingerprint; the same key then writes without a look,
    another key is refused from the log, and a column the schema gained is added to the existing table."""
    import pytest
    from pyspark.sql.types import StringType, StructField, StructType

    from jobs.core.tables import FINGERPRINT_PROPERTY, forget_ready_tables, ready_table, table_version
    from jobs.privacy.keys import KeyMismatchError

    path = str(tmp_path / "staged" / "consent")
    schema = staged_schema("consent")
    ready_table(spark, path, schema, "fp-1", partition_by=("establishment_id",))
    assert table_properties(spark, path)[FINGERPRINT_PROPERTY] == "fp-1"
    version = table_version(spark, path)
    ready_table(spark, path, schema, "fp-1", partition_by=("establishment_id",))
    assert table_version(spark, path) == version  # no commit, no ALTER
    with pytest.raises(KeyMismatchError, match="fp-1"):
        ready_table(spark, path, schema, "fp-2", partition_by=("establishment_id",))

    forget_ready_tables()
    wider = StructType(schema.fields + [StructField("consent_note_id", StringType(), True)])
    ready_table(spark, path, wider, "fp-1", partition_by=("establishment_id",))
    assert "consent_note_id" in spark.read.format("delta").load(path).columns

    # The table made again with another key, by another process: the remembered one is not taken for it.
    import shutil

    shutil.rmtree(path)
    ensure_table(spark, path, schema, "fp-2", partition_by=("establishment_id",))
    with pytest.raises(KeyMismatchError, match="fp-2"):
        ready_table(spark, path, wider, "fp-1", partition_by=("establishment_id",))


def test_a_write_s_own_count_is_read_from_its_tagged_commit_after_another_writer_s(spark, tmp_path):
    from jobs.core.tables import _commit_since, new_commit_tag

    path = str(tmp_path / "t")
    spark.createDataFrame([], "x string").write.format("delta").save(path)  # version 0
    tag = new_commit_tag()
    spark.createDataFrame([("a",), ("b",), ("c",)], "x string").write.format("delta").mode("append") \
        .option("userMetadata", tag).save(path)
    spark.createDataFrame([("d",)], "x string").write.format("delta").mode("append").save(path)  # another writer
    assert written_rows(_commit_since(path, tag, 0)) == 3
    assert _commit_since(path, tag, 1) is NO_COMMIT  # made before the version read: not this write's


def test_operations_on_several_tables_run_side_by_side_and_all_end_before_a_failure_is_raised(monkeypatch):
    import threading
    import time

    from jobs.core.tables import ENV_TABLE_THREADS, on_each_table

    monkeypatch.setenv(ENV_TABLE_THREADS, "3")
    started = threading.Barrier(3, timeout=10)  # passes only if three operations run at once
    ended: list[str] = []

    def operation(name: str, fails: bool = False):
        def run():
            started.wait()
            time.sleep(0.05)
            ended.append(name)
            if fails:
                raise RuntimeError(f"{name} failed")
            return name.upper()
        return run

    assert on_each_table({n: operation(n) for n in ("a", "b", "c")}) == {"a": "A", "b": "B", "c": "C"}

    ended.clear()
    started.reset()
    with pytest.raises(RuntimeError, match="b failed"):
        on_each_table({"a": operation("a"), "b": operation("b", fails=True), "c": operation("c")})
    assert sorted(ended) == ["a", "b", "c"]  # the siblings of the failing one were not abandoned

    monkeypatch.setenv(ENV_TABLE_THREADS, "0")
    with pytest.raises(ValueError, match=ENV_TABLE_THREADS):
        on_each_table({"a": operation("a")})


def test_a_table_operation_in_a_pool_thread_keeps_its_callers_spark_job_group(spark, monkeypatch):
    from jobs.core.tables import ENV_TABLE_THREADS, on_each_table

    monkeypatch.setenv(ENV_TABLE_THREADS, "2")
    context = spark.sparkContext
    context.setJobGroup("land-benchmark", "a stage measured by job group")
    try:
        seen = on_each_table({n: (lambda: context.getLocalProperty("spark.jobGroup.id")) for n in ("a", "b")})
    finally:
        context.setJobGroup("(none)", "")
    assert seen == {"a": "land-benchmark", "b": "land-benchmark"}


ROWS = "est string, batch string, stage string, n int"


def _rows(spark, path: str) -> list[tuple]:
    return sorted(tuple(r) for r in spark.read.format("delta").load(path).collect())


def _operation(commit: dict) -> str:
    return commit["operationParameters"]["mode"]


def test_a_batch_s_first_write_appends_and_a_rewrite_replaces_only_its_own_rows(spark, tmp_path):
    path = str(tmp_path / "transient")
    create_table(spark, path, spark.createDataFrame([], ROWS).schema, partition_by=("est", "batch"))
    other = replace_rows(spark.createDataFrame([("e1", "b0", "s", 0)], ROWS), path, {"est": "e1", "batch": "b0"})
    first = replace_rows(spark.createDataFrame([("e1", "b1", "s", 1), ("e1", "b1", "s", 2)], ROWS), path,
                         {"est": "e1", "batch": "b1"})
    assert (_operation(other), _operation(first), written_rows(first)) == ("Append", "Append", 2)
    again = replace_rows(spark.createDataFrame([("e1", "b1", "s", 3)], ROWS), path, {"est": "e1", "batch": "b1"})
    assert (_operation(again), written_rows(again)) == ("Overwrite", 1)
    assert _rows(spark, path) == [("e1", "b0", "s", 0), ("e1", "b1", "s", 3)]
    assert replace_rows(spark.createDataFrame([], ROWS), path, {"est": "e1", "batch": "b2"}) is NO_COMMIT
    assert _rows(spark, path) == [("e1", "b0", "s", 0), ("e1", "b1", "s", 3)]


def test_statistics_rule_files_out_and_a_column_without_them_rules_nothing_out(spark, tmp_path):
    path = str(tmp_path / "quarantine")
    schema = spark.createDataFrame([], "establishment_id string, batch_id string, stage string, n int").schema
    ensure_table(spark, path, schema, partition_by=("establishment_id",))  # statistics of batch_id, not stage
    rows = [("e1", "b1", "ingest", 1)]
    replace_rows(spark.createDataFrame(rows, schema), path, {"establishment_id": "e1", "batch_id": "b1", "stage": "ingest"})
    table = open_delta(path)
    assert files_that_may_hold(table, {"establishment_id": "e1", "batch_id": "b2"}) == 0  # outside min..max
    assert files_that_may_hold(table, {"establishment_id": "e2", "batch_id": "b1"}) == 0  # another partition
    assert files_that_may_hold(table, {"establishment_id": "e1", "batch_id": "b1", "stage": "validate"}) == 1
    late = replace_rows(spark.createDataFrame([("e1", "b1", "validate", 2)], schema), path,
                        {"establishment_id": "e1", "batch_id": "b1", "stage": "validate"})
    assert _operation(late) == "Overwrite"
    assert _rows(spark, path) == [("e1", "b1", "ingest", 1), ("e1", "b1", "validate", 2)]


def test_rows_another_writer_committed_after_the_check_are_replaced_not_doubled(spark, tmp_path, monkeypatch):
    """The log said no file held the batch, then another writer's rows of the batch landed before the append."""
    import jobs.core.tables as tables

    path = str(tmp_path / "transient")
    create_table(spark, path, spark.createDataFrame([], ROWS).schema, partition_by=("est", "batch"))
    checks = []
    real = tables.files_that_may_hold

    def racing(table, match):
        if not checks:  # the check before the write: the other writer commits right after it
            spark.createDataFrame([("e1", "b1", "theirs", 1)], ROWS).write.format("delta").mode("append").save(path)
        checks.append(real(table, match))
        return checks[-1]

    monkeypatch.setattr(tables, "files_that_may_hold", racing)
    commit = replace_rows(spark.createDataFrame([("e1", "b1", "ours", 2)], ROWS), path, {"est": "e1", "batch": "b1"})
    assert checks[0] == 0 and checks[1] == 2  # the append's own file and the other writer's
    assert _operation(commit) == "Overwrite" and written_rows(commit) == 1
    assert _rows(spark, path) == [("e1", "b1", "ours", 2)]
