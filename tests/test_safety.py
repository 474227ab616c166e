"""Paused publish or maintenance is said loudly, with what waits for it; a manual run says it waited."""

import datetime as dt

from jobs.core.lake import Lake
from jobs.privacy.safety import MAINTENANCE_DAG, PUBLISH_DAG, manual_run_note, paused_warnings, pending_erasures, unpublished_silver
from tests.conftest import copy_lake


def test_nothing_waits_after_a_publish_and_a_silver_change_is_named(spark, consortium, planted_lake, tmp_path):
    lake = Lake(str(planted_lake / "lake"))
    assert unpublished_silver(lake, consortium.projects) == []
    assert paused_warnings([], lake, consortium.projects) == []
    quiet = paused_warnings([PUBLISH_DAG], lake, consortium.projects)
    assert len(quiet) == 1 and "affluent_publish is PAUSED" in quiet[0] and "has not changed" in quiet[0]

    changed = Lake(str(copy_lake(planted_lake / "lake", tmp_path / "lake")))
    spark.sql(f"ALTER TABLE delta.`{changed.silver('patient')}` SET TBLPROPERTIES ('affluent.test' = 'changed')")
    assert unpublished_silver(changed, consortium.projects) == ["patient"]
    [message] = paused_warnings([PUBLISH_DAG, "affluent_ingest_x"], changed, consortium.projects)
    assert "silver changed since the last publish (patient)" in message
    assert "airflow dags unpause affluent_publish" in message


def test_never_published_silver_is_all_unpublished(planted_lake, tmp_path, consortium):
    lake = Lake(str(copy_lake(planted_lake / "lake", tmp_path / "lake")))
    assert "patient" in unpublished_silver(lake, [])  # no manifest read: every silver table waits


def test_pending_erasures_are_counted_for_a_paused_maintenance(erased_history):
    lake, consortium = erased_history["lake"], erased_history["consortium"]
    assert pending_erasures(lake) == 1  # the request whose patient has not landed yet
    [message] = paused_warnings([MAINTENANCE_DAG], lake, consortium.projects)
    assert "affluent_maintenance is PAUSED" in message and "1 erasure request(s) pending" in message


def test_a_manual_run_that_waited_says_so():
    requested = dt.datetime(2026, 6, 15, 8, 0, tzinfo=dt.timezone.utc)
    note = manual_run_note("manual", requested, requested + dt.timedelta(minutes=7))
    assert note and "started 420 s later" in note and "delivery order" in note
    assert manual_run_note("DagRunType.MANUAL", requested, requested + dt.timedelta(minutes=7)) == note
    assert manual_run_note("manual", requested, requested + dt.timedelta(seconds=5)) is None
    assert manual_run_note("scheduled", requested, requested + dt.timedelta(minutes=7)) is None
    assert manual_run_note("manual", requested, None) is None
