"""Land: MERGE into silver keeps the latest state, is idempotent, reconciles and refuses a foreign key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs.core.batchlog import BATCH_LOG
from jobs.core.lake import Lake
from jobs.core.schemas import silver_columns
from jobs.core.tables import table_version
from tests.conftest import copy_lake
from tests.test_validate import DAY, EST, EXTRACTED, FP, consent, enc, stage_batch

D = dt.datetime


@pytest.fixture()
def lake(lake_root) -> Lake:
    return Lake(lake_root)


@pytest.fixture(scope="module")
def first_full_batch(spark, consortium, tmp_path_factory) -> Path:
    """A lake where b1 (encounters v1 and v2, a full batch) has landed; built once for the module."""
    lake = Lake(str(tmp_path_factory.mktemp("land-b1") / "lake"))
    run_batch(spark, lake, consortium, "b1", {"encounter": [enc("v1"), enc("v2")]}, EXTRACTED, kind="full")
    return Path(lake.root)


@pytest.fixture()
def landed(first_full_batch, tmp_path) -> Lake:
    """A copy of :func:`first_full_batch`'s lake for one test to change."""
    return Lake(str(copy_lake(first_full_batch, tmp_path / "lake")))


def run_batch(spark, lake, consortium, batch_id, rows, extracted_at, kind="incremental", **figures):
    from jobs.stages.land import land_batch
    from jobs.stages.validate import validate_batch

    stage_batch(spark, lake, batch_id, rows, extracted_at=extracted_at, kind=kind, **figures)
    validate_batch(spark, lake, consortium, EST, batch_id, kind)
    return land_batch(spark, lake, EST, batch_id, FP)


def latest_state(deliveries: list[tuple[dt.datetime, list[dict]]]) -> dict[str, tuple]:
    """The expected silver: per key, its most recently extracted version, absent if that one is a delete."""
    last: dict[str, tuple[dt.datetime, dict]] = {}
    for extracted_at, rows in deliveries:
        for row in rows:
            key = row["visit_occurrence_id"]
            if key not in last or extracted_at > last[key][0]:
                last[key] = (extracted_at, row)
    return {k: (row["person_id"], row["visit_source_value"], at) for k, (at, row) in last.items()
            if row.get("record_action", "upsert") == "upsert"}


def test_silver_holds_the_latest_state_after_full_incremental_and_late_batches(spark, lake, consortium):
    from jobs.stages.land import reconcile

    b1 = [enc(f"v{i}") for i in range(1, 7)]
    b2 = [enc("v1", visit_source_value="outpatient"),                       # update
          {"visit_occurrence_id": "v2", "record_action": "delete"},          # delete
          enc("v7")]                                                         # new
    b3 = [enc("v1", visit_source_value="emergency"),                        # newer update
          {"visit_occurrence_id": "v3", "record_action": "delete"},
          enc("v8")]
    late = [enc("v1", visit_source_value="day_surgery"),                    # older than b3's: ignored
            enc("v3", visit_source_value="day_surgery"),                    # deleted later: stays deleted
            enc("v4", visit_source_value="day_surgery"),                    # newer than b1's: applied
            {"visit_occurrence_id": "v7", "record_action": "delete"},        # older than v7 in b2? no: later
            enc("v9")]                                                       # new
    t1, t2, t3, t_late = EXTRACTED, EXTRACTED + 7 * DAY, EXTRACTED + 21 * DAY, EXTRACTED + 14 * DAY

    run_batch(spark, lake, consortium, "b1", {"encounter": b1}, t1, kind="full", duplicates={"encounter": 2})
    run_batch(spark, lake, consortium, "b2", {"encounter": b2}, t2)
    run_batch(spark, lake, consortium, "b3", {"encounter": b3}, t3, ingest_quarantined={"encounter": 1})
    outcome = run_batch(spark, lake, consortium, "b2b", {"encounter": late}, t_late)
    assert outcome.landed == {"encounter": 5}

    silver = spark.read.format("delta").load(lake.silver("encounter"))
    assert tuple(silver.columns) == silver_columns("encounter")
    got = {r.visit_occurrence_id: (r.person_id, r.visit_source_value, r._extracted_at) for r in silver.collect()}
    expected = latest_state([(t1, b1), (t2, b2), (t3, b3), (t_late, late)])
    assert got == expected
    assert got["v1"][1] == "emergency" and "v3" not in got and got["v4"][1] == "day_surgery" and "v7" not in got

    rows = reconcile(spark, lake, EST).collect()
    assert [(r.batch_id, r.rows_read, r.rows_landed, r.rows_quarantined, r.rows_duplicates, r.holds) for r in rows] == [
        ("b1", 8, 6, 0, 2, True), ("b2", 3, 3, 0, 0, True), ("b2b", 5, 5, 0, 0, True), ("b3", 4, 3, 1, 0, True)]

    changes = spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", 0) \
        .load(lake.silver("encounter"))
    assert changes.where(F.col("_change_type") == "delete").count() == 3


def test_a_full_batch_is_a_snapshot_whose_absent_records_are_deleted(spark, lake, consortium):
    """Records a full batch no longer holds are deleted with a tombstone; one invalid in it is kept;
    a full batch with lines quarantined at ingest deletes nothing."""
    from jobs.core.ops import read_batch_log

    t1, t3, t4 = EXTRACTED, EXTRACTED + 2 * DAY, EXTRACTED + 3 * DAY
    run_batch(spark, lake, consortium, "b1", {"encounter": [enc(f"v{i}") for i in range(1, 5)],
                                              "consent": [consent("c1", decision="deny"), consent("c2")]},
              t1, kind="full")
    # v3 is still sent but invalid now (no start): quarantined, its landed version stays. v4 is gone.
    # The refusal c1 is left out of the snapshot: a consent decision is never deleted by absence.
    run_batch(spark, lake, consortium, "b3", {"encounter": [enc("v1"), enc("v2", visit_source_value="outpatient"),
                                                           enc("v3", start=None)],
                                              "consent": [consent("c2")]}, t3, kind="full")
    silver = lambda: {r.visit_occurrence_id: r.visit_source_value  # noqa: E731
                      for r in spark.read.format("delta").load(lake.silver("encounter")).collect()}
    assert silver() == {"v1": "inpatient", "v2": "outpatient", "v3": "inpatient"}
    assert spark.read.format("delta").load(lake.silver("consent")).count() == 2
    deletions = spark.read.format("delta").load(lake.ops("silver_deletions")).collect()
    assert [(r.record_id, r.deleted_at, r.batch_id) for r in deletions] == [("v4", t3, "b3")]
    message = (read_batch_log(spark, lake)
               .where("batch_id = 'b3' AND stage = 'land' AND dataset = 'encounter'").first().message)
    assert "full snapshot: 1 record(s) absent from it deleted" in message

    # A line of the next snapshot was quarantined at ingest: it may be v1, v2 or v3; nothing is deleted.
    run_batch(spark, lake, consortium, "b4", {"encounter": [enc("v1")]}, t4, kind="full",
              ingest_quarantined={"encounter": 1})
    assert set(silver()) == {"v1", "v2", "v3"}
    message = (read_batch_log(spark, lake)
               .where("batch_id = 'b4' AND stage = 'land' AND dataset = 'encounter'").first().message)
    assert "records absent from it were not deleted (1 line(s) quarantined at ingest" in message


def test_the_log_tells_whether_silver_may_hold_records_older_than_a_snapshot(spark, lake, consortium, tmp_path,
                                                                            monkeypatch):
    """A first snapshot has no older record to miss: the files' partition values and ``_extracted_at``
    minimums say so, and land asks Spark nothing; a file without statistics may hold one."""
    from jobs.stages import land
    from jobs.stages.land import absent_counts, may_hold_older

    t1 = EXTRACTED
    path = lake.silver("encounter")
    assert not may_hold_older(path, EST, t1)  # no table yet
    run_batch(spark, lake, consortium, "b1", {"encounter": [enc("v1"), enc("v2")]}, t1, kind="full")
    assert not may_hold_older(path, EST, t1)
    assert not may_hold_older(path, EST, None)
    assert may_hold_older(path, EST, t1 + DAY)
    assert not may_hold_older(path, "another_establishment", t1 + DAY)

    def no_query(*args, **kwargs):
        raise AssertionError("absent records queried although the log rules them out")

    monkeypatch.setattr(land, "_absent_records", no_query)
    assert absent_counts(spark, lake, ["encounter"], EST, "b1", t1) == {"encounter": 0}
    with pytest.raises(AssertionError, match="queried although"):
        absent_counts(spark, lake, ["encounter"], EST, "b2", t1 + DAY)

    bare = str(tmp_path / "no-statistics")
    spark.createDataFrame([(EST, t1)], "establishment_id string, _extracted_at timestamp").write.format("delta") \
        .option("delta.dataSkippingNumIndexedCols", "0").partitionBy("establishment_id").save(bare)
    assert may_hold_older(bare, EST, t1)


def test_landing_twice_changes_nothing(spark, landed, consortium):
    from jobs.stages.land import land_batch, merge_into_silver
    from jobs.stages.validate import validated_path

    lake = landed  # b1 landed
    version = table_version(spark, lake.silver("encounter"))
    assert land_batch(spark, lake, EST, "b1", FP).skipped
    assert table_version(spark, lake.silver("encounter")) == version

    # Even below the batch log's guard, the same MERGE is not committed twice, and the
    # idempotent-write ids do not stay in the session to swallow later writes.
    rows = spark.read.format("delta").load(validated_path(lake, "encounter")).where(F.col("_batch_id") == "b1")
    merge_into_silver(spark, lake, "encounter", rows, EST, "b1")
    assert table_version(spark, lake.silver("encounter")) == version
    assert spark.conf.get("spark.databricks.delta.write.txnAppId", None) is None
    run_batch(spark, lake, consortium, "b2", {"encounter": [enc("v3")]}, EXTRACTED + DAY)
    assert table_version(spark, lake.silver("encounter")) == version + 1


def test_a_batch_that_does_not_add_up_lands_nothing(spark, landed, consortium):
    from jobs.stages.land import ReconciliationError, land_batch
    from jobs.core.ops import append_batch_log
    from jobs.stages.validate import validate_batch

    lake = landed  # b1 landed
    version = table_version(spark, lake.silver("encounter"))
    stage_batch(spark, lake, "b2", {"encounter": [enc("v3"), enc("v4")]}, extracted_at=EXTRACTED + DAY,
                kind="incremental")
    validate_batch(spark, lake, consortium, EST, "b2", "incremental")
    # A later ingest entry announcing one row more than what went on (a row lost between stages).
    append_batch_log(spark, lake, [{"establishment_id": EST, "batch_id": "b2", "dataset": "encounter",
                                    "stage": "ingest", "status": "ingested", "rows_read": 3, "rows_quarantined": 0,
                                    "kind": "incremental"}])
    with pytest.raises(ReconciliationError, match=r"encounter: read 3 != landed 2 \+ quarantined 0"):
        land_batch(spark, lake, EST, "b2", FP)
    assert table_version(spark, lake.silver("encounter")) == version


def test_datasets_ingest_passed_no_row_on_are_not_read_by_validate_or_land(spark, landed, consortium, monkeypatch):
    """An incremental delivery carries every dataset's file, most of them empty: validate and land look only
    at the datasets with rows, and the empty ones still get their zero figures in the log."""
    from jobs.stages import land, validate

    read: dict[str, list[str]] = {"validate": [], "land": []}
    read_staged, batch_rows = validate.read_staged, land._batch_rows

    def spy_staged(*args, **kwargs):
        found = read_staged(*args, **kwargs)
        read["validate"] += found
        return found

    def spy_rows(spark, lake, establishment_id, batch_id, datasets):
        read["land"] += datasets
        return batch_rows(spark, lake, establishment_id, batch_id, datasets)

    monkeypatch.setattr(validate, "read_staged", spy_staged)
    monkeypatch.setattr(land, "_batch_rows", spy_rows)
    lake = landed  # b1 landed: staged, validated and silver tables of encounter exist
    # b2: two encounters; its patient file held one line, quarantined at ingest; its consent file was empty.
    outcome = run_batch(spark, lake, consortium, "b2", {"encounter": [enc("v3"), enc("v4")], "patient": [],
                                                        "consent": []},
                        EXTRACTED + DAY, ingest_quarantined={"patient": 1})
    assert read == {"validate": ["encounter"], "land": ["encounter"]}
    assert outcome.landed == {"encounter": 2, "patient": 0, "consent": 0}
    assert outcome.quarantined == {"encounter": 0, "patient": 1, "consent": 0}
    logged = {(r.dataset, r.stage): (r.rows_read, r.rows_quarantined) for r in
              spark.read.format("delta").load(lake.ops(BATCH_LOG)).where(F.col("batch_id") == "b2").collect()}
    assert logged[("patient", "validate")] == (0, 0) and logged[("consent", "land")] == (0, 0)
    assert logged[("patient", "land")] == (1, 1)


def test_a_silver_table_written_with_another_key_is_refused(spark, landed, consortium):
    from jobs.privacy.keys import KeyMismatchError
    from jobs.stages.land import land_batch
    from jobs.core.tables import FINGERPRINT_PROPERTY
    from jobs.stages.validate import validate_batch

    lake = landed  # b1 landed
    props = spark.sql(f"SHOW TBLPROPERTIES delta.`{lake.silver('encounter')}`").collect()
    assert {r.key: r.value for r in props}[FINGERPRINT_PROPERTY] == FP
    version = table_version(spark, lake.silver("encounter"))

    stage_batch(spark, lake, "b2", {"encounter": [enc("v3")]}, extracted_at=EXTRACTED + DAY, kind="incremental")
    validate_batch(spark, lake, consortium, EST, "b2", "incremental")
    with pytest.raises(KeyMismatchError):
        land_batch(spark, lake, EST, "b2", "another-fingerprint")
    assert table_version(spark, lake.silver("encounter")) == version


def test_silver_tables_are_registered_documented_and_feed_their_changes(spark, landed, consortium):
    from jobs.stages.land import register_silver_tables

    lake = landed  # b1 landed (and registered where the module's lake was built)
    assert register_silver_tables(spark, lake) == ["silver.encounter"]
    assert register_silver_tables(spark, lake) == ["silver.encounter"]  # idempotent
    assert spark.sql("SELECT * FROM silver.encounter").count() == 2

    described = {r.col_name: r.comment for r in spark.sql("DESCRIBE TABLE silver.encounter").collect()}
    assert "pseudonym" in described["person_id"] and described["visit_start_date"]
    detail = spark.sql("DESCRIBE DETAIL silver.encounter").first()
    assert "encounter" in detail.description.lower()
    assert detail.properties["delta.enableChangeDataFeed"] == "true"


def test_changes_are_marked_with_deletion_vectors_and_purged_by_maintenance(spark, lake, consortium):
    from pathlib import Path

    from jobs.stages.maintenance import compact_and_vacuum, retention_check_disabled

    run_batch(spark, lake, consortium, "b1", {"encounter": [enc(f"v{i}") for i in range(1, 7)]
                                              + [enc("v7", care_site_source_value="UNIT-SENT-THEN-DELETED")]},
              EXTRACTED, kind="full")
    run_batch(spark, lake, consortium, "b2", {"encounter": [enc("v1", visit_source_value="outpatient"),
                                                            {"visit_occurrence_id": "v7", "record_action": "delete"}]},
              EXTRACTED + DAY)

    silver = lake.silver("encounter")
    assert spark.sql(f"DESCRIBE DETAIL delta.`{silver}`").first().properties["delta.enableDeletionVectors"] == "true"
    merge = (spark.sql(f"DESCRIBE HISTORY delta.`{silver}`").where("operation = 'MERGE'")
             .orderBy(F.col("version").desc()).first().operationMetrics)
    # The update and the delete hide the old rows; no file of silver is copied out again.
    assert int(merge["numTargetDeletionVectorsAdded"]) >= 1
    assert int(merge["numTargetFilesRemoved"]) == 0
    assert int(merge["numTargetRowsCopied"]) == 0

    files = lambda: b"".join(p.read_bytes() for p in Path(silver).rglob("*.parquet"))  # noqa: E731
    assert b"UNIT-SENT-THEN-DELETED" in files()  # hidden, not yet gone
    with retention_check_disabled(spark):
        compact_and_vacuum(spark, lake, retain_hours=0)
    assert b"UNIT-SENT-THEN-DELETED" not in files()
    assert {r.visit_occurrence_id: r.visit_source_value for r in spark.read.format("delta").load(silver).collect()} \
        == {"v1": "outpatient"} | {f"v{i}": "inpatient" for i in range(2, 7)}


def _changes(spark, path: str, after: int):
    """The change feed's rows committed after table version ``after``."""
    return (spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", 0).load(path)
            .where(F.col("_commit_version") > after).select("visit_occurrence_id", "_change_type").collect())


def test_an_identical_redelivery_changes_no_row_and_feeds_no_change(spark, landed, consortium):
    """The same records delivered again as a new batch all land and change nothing: same rows, same
    files, an empty change feed, and the batch log says how many were unchanged."""
    from jobs.core.ops import read_batch_log

    lake = landed  # b1 (v1, v2) landed
    path = lake.silver("encounter")
    before = {tuple(r) for r in spark.read.format("delta").load(path).collect()}
    files, version = set(spark.read.format("delta").load(path).inputFiles()), table_version(spark, path)

    outcome = run_batch(spark, lake, consortium, "b2", {"encounter": [enc("v1"), enc("v2")]}, EXTRACTED + DAY,
                        kind="full")
    assert outcome.landed == {"encounter": 2} and outcome.unchanged == {"encounter": 2}
    assert {tuple(r) for r in spark.read.format("delta").load(path).collect()} == before  # _batch_id still b1
    assert set(spark.read.format("delta").load(path).inputFiles()) == files
    assert _changes(spark, path, version) == []
    entry = read_batch_log(spark, lake).where("batch_id = 'b2' AND stage = 'land'").first()
    assert (entry.rows_landed, entry.rows_unchanged) == (2, 2)
    assert "0 inserted, 0 updated, 0 deleted, 2 unchanged" in entry.message and "no row changed" in entry.message

    # One record changed, one the same, one new: only the first and the last reach silver and its feed.
    version = table_version(spark, path)
    outcome = run_batch(spark, lake, consortium, "b3", {"encounter": [enc("v1", visit_source_value="outpatient"),
                                                                      enc("v2"), enc("v3")]}, EXTRACTED + 2 * DAY)
    assert outcome.unchanged == {"encounter": 1}
    assert sorted((r.visit_occurrence_id, r._change_type) for r in _changes(spark, path, version)) == [
        ("v1", "update_postimage"), ("v1", "update_preimage"), ("v3", "insert")]
    batches = {r.visit_occurrence_id: r._batch_id for r in spark.read.format("delta").load(path).collect()}
    assert batches == {"v1": "b3", "v2": "b1", "v3": "b3"}
    entry = read_batch_log(spark, lake).where("batch_id = 'b3' AND stage = 'land' AND dataset = 'encounter'").first()
    assert entry.rows_unchanged == 1 and "1 inserted, 1 updated, 0 deleted, 1 unchanged" in entry.message


def test_content_comparison_leaves_out_key_establishment_and_lineage():
    from jobs.stages.land import content_columns, content_differs

    columns = content_columns("encounter")
    assert "visit_source_value" in columns and "person_id" in columns
    assert not {"visit_occurrence_id", "establishment_id", "_batch_id", "_extracted_at"} & set(columns)
    assert content_differs("encounter").startswith("NOT (t.`person_id` <=> s.`person_id` AND")
