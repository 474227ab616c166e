"""The batch queue: delivery order, blocking stops, steward decisions, fixed and re-delivered batches."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest

from jobs.stages.batch_queue import (
    EstablishmentQueue,
    QueueBlocked,
    QueuedBatch,
    batch_log_entries,
    batch_state,
    establishment_queue,
)
from jobs.core.batchlog import BATCH_LOG_COLUMNS, BatchRejected, QueueState, Stage, Status
from jobs.core.lake import Lake
from jobs.stages.landing import check_batch
from tests.landing_helpers import LAURENTIDES_PATIENT_HEADER, latin1_csv, write_batch

EST = "chu_laurentides"
T0 = dt.datetime(2026, 1, 5, 3, 0, tzinfo=dt.timezone.utc)
PATIENTS = [
    "L001;TREM85521512;Tremblay;Éloïse;12/02/1985;F;12 rue des Érables;Montréal;H2X 1Y4;514-555-0101;e@x.ca;;A",
    "L002;GAGL90010112;Gagnon;Luc;01/01/1990;M;3 av. du Parc;Laval;H7N 2B3;450-555-0102;l@x.ca;;A",
]


def entry(batch_id: str, stage: Stage, status: Status, minute: int, **values) -> dict:
    row = dict.fromkeys(BATCH_LOG_COLUMNS)
    row.update(establishment_id=EST, batch_id=batch_id, stage=stage.value, status=status.value,
               recorded_at=T0 + dt.timedelta(minutes=minute), **values)
    return row


def deliver(landing, batch_id: str, rows=PATIENTS, **kwargs):
    return write_batch(landing, EST, batch_id, {"patients.csv": ("patient", latin1_csv(LAURENTIDES_PATIENT_HEADER,
                                                                                          rows))}, **kwargs)


def manifest_of(folder) -> str:
    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


def edit_manifest(folder, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------ landing contract ----

@pytest.mark.parametrize("change, reason", [
    (lambda m: m["files"][0].update(path="pat\x00ients.csv"), r"control character U\+0000"),
    (lambda m: m["files"][0].update(rows=True), r"files\[0\]\.rows: Input should be a valid integer"),
    (lambda m: m["files"][0].update(rows="2"), r"files\[0\]\.rows: Input should be a valid integer"),
    (lambda m: m["files"].append(dict(m["files"][0], path="./patients.csv")), "listed twice"),
])
def test_a_manifest_breaking_the_typed_contract_is_rejected_naming_the_file(tmp_path, consortium, change, reason):
    folder = deliver(tmp_path, "20260105-001")
    edit_manifest(folder, change)
    with pytest.raises(BatchRejected, match=reason) as rejected:
        check_batch(tmp_path, consortium, EST, "20260105-001")
    assert rejected.value.file


def test_a_carriage_return_inside_a_field_is_rejected_before_anything_is_read(tmp_path, consortium):
    row = PATIENTS[0].replace("12 rue des Érables", "12 rue\rdes Érables")
    folder = deliver(tmp_path, "20260105-001", rows=[row, PATIENTS[1]])
    edit_manifest(folder, lambda m: m["files"][0].update(rows=2))
    with pytest.raises(BatchRejected, match="line 2 holds a carriage return") as rejected:
        check_batch(tmp_path, consortium, EST, "20260105-001")
    assert rejected.value.file == "20260105-001#0"  # its reference: file names stay in landing


def test_a_path_with_dot_slash_is_the_same_file(tmp_path, consortium):
    folder = deliver(tmp_path, "20260105-001")
    edit_manifest(folder, lambda m: m["files"][0].update(path="./patients.csv"))
    batch = check_batch(tmp_path, consortium, EST, "20260105-001")
    assert [f.path for f in batch.files] == ["patients.csv"]


def _with_file_patterns(consortium, patterns: dict[str, list[str]]):
    import dataclasses

    est = consortium.establishments[EST]
    changed = est.model_copy(update={"input": est.input.model_copy(update={"files": patterns})})
    return dataclasses.replace(consortium, establishments={**consortium.establishments, EST: changed})


@pytest.mark.parametrize("patterns, dataset, reason", [
    ({"patient": ["patient*.csv"], "encounter": ["encounter*.csv"]}, "patient", None),
    ({"patient": ["*.csv"], "encounter": ["patients.*"]}, None, r"matches several datasets \['encounter', 'patient'\]"),
    ({"encounter": ["encounter*.csv"]}, None, "matches no dataset of the profile's files patterns"),
    ({}, None, "declares no files patterns"),
])
def test_a_manifest_entry_without_dataset_takes_it_from_the_profiles_file_patterns(tmp_path, consortium, patterns,
                                                                                  dataset, reason):
    folder = deliver(tmp_path, "20260105-001")
    edit_manifest(folder, lambda m: m["files"][0].pop("dataset"))
    consortium = _with_file_patterns(consortium, patterns)
    if reason is None:
        assert [f.dataset for f in check_batch(tmp_path, consortium, EST, "20260105-001").files] == [dataset]
        return
    with pytest.raises(BatchRejected, match=reason) as rejected:
        check_batch(tmp_path, consortium, EST, "20260105-001")
    assert rejected.value.file == "20260105-001#0" and "patients.csv" not in str(rejected.value)


# ----------------------------------------------------------- queue rules ----

def test_a_batch_stopped_at_validate_blocks_the_later_ones_until_a_steward_acts():
    ingested = entry("b1", Stage.INGEST, Status.INGESTED, 1, manifest_sha256="m1")
    stopped = entry("b1", Stage.VALIDATE, Status.STOPPED, 2, message="batch.quarantined_rate failed")
    blocked = batch_state("b1", [ingested, stopped], "m1")
    assert blocked.state == QueueState.BLOCKED and blocked.stage == Stage.VALIDATE
    queue = EstablishmentQueue(EST, (blocked, batch_state("b2", [], "m2")))
    assert queue.pending == [] and queue.blocked_by.batch_id == "b1" and queue.held_back == ["b2"]
    assert "batch.quarantined_rate failed" in queue.explain() and "affluent batch retry" in queue.explain()

    retried = batch_state("b1", [ingested, stopped, entry("b1", Stage.STEWARD, Status.RETRY, 3)], "m1")
    assert retried.state == QueueState.IN_PROGRESS
    assert EstablishmentQueue(EST, (retried, batch_state("b2", [], "m2"))).pending == ["b1", "b2"]

    skipped = batch_state("b1", [ingested, stopped, entry("b1", Stage.STEWARD, Status.SKIPPED, 3,
                                                          message="extract withdrawn")], "m1")
    assert skipped.state == QueueState.SKIPPED
    assert EstablishmentQueue(EST, (skipped, batch_state("b2", [], "m2"))).pending == ["b2"]


def test_a_batch_in_progress_is_taken_before_the_next_one():
    queue = EstablishmentQueue(EST, (batch_state("b1", [entry("b1", Stage.INGEST, Status.INGESTED, 1)], "m1"),
                                     batch_state("b2", [], "m2")))
    assert queue.pending == ["b1", "b2"]


def test_a_rejected_batch_is_pending_again_once_its_manifest_changes():
    rejected = [entry("b1", Stage.INGEST, Status.REJECTED, 1, manifest_sha256="old", message="file x is missing")]
    assert batch_state("b1", rejected, "old").state == QueueState.BLOCKED
    assert batch_state("b1", rejected, "fixed").state == QueueState.WAITING
    # Rejected while its manifest was still missing: pending once the manifest is there.
    early = [entry("b1", Stage.INGEST, Status.REJECTED, 1, message="no manifest.json")]
    assert batch_state("b1", early, None).state == QueueState.INCOMPLETE
    assert batch_state("b1", early, "complete").state == QueueState.WAITING
    # Rejected again after the fix: blocked again, with the new reason.
    again = rejected + [entry("b1", Stage.INGEST, Status.REJECTED, 2, manifest_sha256="fixed", message="sha256")]
    assert batch_state("b1", again, "fixed").state == QueueState.BLOCKED


def test_a_landed_batch_delivered_again_with_other_content_goes_back_once_to_log_the_conflict():
    done = [entry("b1", Stage.INGEST, Status.INGESTED, 1, manifest_sha256="m1"),
            entry("b1", Stage.LAND, Status.LANDED, 2)]
    assert batch_state("b1", done, "m1").state == QueueState.LANDED
    assert batch_state("b1", done, "m1-changed").state == QueueState.WAITING
    logged = done + [entry("b1", Stage.INGEST, Status.CONFLICT, 3, manifest_sha256="m1-changed")]
    assert batch_state("b1", logged, "m1-changed").state == QueueState.LANDED


def test_an_incomplete_delivery_holds_the_later_ones_back():
    queue = EstablishmentQueue(EST, (batch_state("b1", [], None), batch_state("b2", [], "m2")))
    assert queue.pending == [] and queue.blocked_by.state == QueueState.INCOMPLETE


def test_land_waits_for_every_earlier_batch():
    queue = EstablishmentQueue(EST, (QueuedBatch("b1", QueueState.BLOCKED, "stopped"),
                                     QueuedBatch("b2", QueueState.IN_PROGRESS)))
    with pytest.raises(QueueBlocked, match="cannot land before b1"):
        queue.require_turn("b2")
    queue.require_turn("b1")


# ----------------------------------------------- with the batch log itself ----

def test_every_rejection_is_logged_with_file_and_reason_and_a_fix_makes_the_batch_pending(spark, consortium,
                                                                                          tmp_path):
    from jobs.stages.ingest import ingest_batch

    lake, landing = Lake(str(tmp_path / "lake")), tmp_path / "landing"
    folder = deliver(landing, "20260105-001")
    deliver(landing, "20260105-002")
    good = json.loads((folder / "manifest.json").read_text())
    edit_manifest(folder, lambda m: m["files"][0].update(path="pat\x00ients.csv"))
    broken = manifest_of(folder)
    with pytest.raises(BatchRejected, match="control character"):
        ingest_batch(spark, lake, landing, consortium, EST, "20260105-001")

    # Read with delta-rs, no Spark: the rejection names its file and the manifest it was made on.
    [logged] = batch_log_entries(lake, EST)
    assert (logged["stage"], logged["status"], logged["manifest_sha256"]) == ("ingest", "rejected", broken)
    assert logged["source_file"] == "20260105-001#0" and "control character" in logged["message"]
    assert "ients" not in logged["message"]  # the delivered name stays in landing
    queue = establishment_queue(lake, landing, consortium, EST)
    assert queue.pending == [] and queue.blocked_by.batch_id == "20260105-001"
    # delta-rs reads the log Spark wrote because ops tables carry no deletion vectors.
    from deltalake import DeltaTable

    assert "deletionVectors" not in (DeltaTable(lake.ops("batch_log")).protocol().reader_features or [])

    (folder / "manifest.json").write_text(json.dumps(good))
    assert establishment_queue(lake, landing, consortium, EST).pending == ["20260105-001", "20260105-002"]


def test_a_landed_batch_delivered_again_with_other_content_is_refused_as_a_conflict(spark, consortium, tmp_path):
    from jobs.stages.ingest import ingest_batch
    from jobs.core.ops import append_batch_log

    lake, landing = Lake(str(tmp_path / "lake")), tmp_path / "landing"
    deliver(landing, "20260105-001")
    ingest_batch(spark, lake, landing, consortium, EST, "20260105-001")
    append_batch_log(spark, lake, [{"establishment_id": EST, "batch_id": "20260105-001", "dataset": "patient",
                                    "stage": Stage.LAND, "status": Status.LANDED}])
    folder = deliver(landing, "20260105-001", rows=PATIENTS[:1])
    with pytest.raises(BatchRejected, match="delivered again after ingest"):
        ingest_batch(spark, lake, landing, consortium, EST, "20260105-001")
    conflict = [e for e in batch_log_entries(lake, EST) if e["status"] == Status.CONFLICT]
    assert [e["manifest_sha256"] for e in conflict] == [manifest_of(folder)]
    assert establishment_queue(lake, landing, consortium, EST).state_of("20260105-001").state == QueueState.LANDED


def test_a_steward_skip_is_recorded_and_unblocks_the_queue(spark, consortium, tmp_path, monkeypatch):
    from jobs.app import cli
    from jobs.core.ops import append_batch_log

    lake, landing = Lake(str(tmp_path / "lake")), tmp_path / "landing"
    deliver(landing, "20260105-001")
    deliver(landing, "20260105-002")
    append_batch_log(spark, lake, [{"establishment_id": EST, "batch_id": "20260105-001", "stage": Stage.VALIDATE,
                                    "status": Status.STOPPED, "message": "batch.row_count_drop"}])
    # The stopped batch's pseudonymised rows wait in validated/ (with another batch's).
    spark.createDataFrame([(EST, "20260105-001", "p1"), (EST, "20260105-001", "p2"), (EST, "20260105-002", "p3")],
                          "establishment_id string, _batch_id string, person_id string"
                          ).write.format("delta").save(lake.validated("patient"))
    monkeypatch.setenv("AFFLUENT_LAKE_ROOT", lake.root)
    monkeypatch.setenv("AFFLUENT_LANDING_ROOT", str(landing))
    assert cli.main(["batch", "skip", EST, "20260105-001", "--reason", "extract withdrawn"]) == 0
    steward = [e for e in batch_log_entries(lake, EST) if e["stage"] == Stage.STEWARD]
    assert [(e["status"], e["message"].split(" (by")[0]) for e in steward] == [("skipped", "extract withdrawn")]
    assert establishment_queue(lake, landing, consortium, EST).pending == ["20260105-002"]
    left = spark.read.format("delta").load(lake.validated("patient")).collect()
    assert [(r._batch_id, r.person_id) for r in left] == [("20260105-002", "p3")]  # a skipped batch never lands


def test_choosing_the_next_batch_needs_no_spark_session(tmp_path, consortium, monkeypatch):
    from jobs.stages import pipeline
    from jobs.core.settings import Settings

    def no_spark(self):
        raise AssertionError("choosing a batch started Spark")

    monkeypatch.setattr(pipeline.Context, "spark", property(no_spark))
    deliver(tmp_path / "landing", "20260105-001")
    ctx = pipeline.Context(Settings.from_env(lake_root=str(tmp_path / "lake"), landing_root=str(tmp_path / "landing")))
    ctx.__dict__["consortium"] = consortium
    assert pipeline.pending(ctx, EST) == ["20260105-001"]


def test_an_unreadable_manifest_is_a_rejection_not_a_crash(tmp_path, consortium, monkeypatch):
    from pathlib import Path

    deliver(tmp_path, "20260105-001")

    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(BatchRejected, match="manifest.json cannot be read: Permission denied") as rejected:
        check_batch(tmp_path, consortium, EST, "20260105-001")
    assert rejected.value.file == "manifest.json"


def test_a_batch_size_is_its_landing_folder_and_unknown_once_the_folder_is_gone(tmp_path):
    from jobs.core.settings import Settings
    from jobs.stages import pipeline

    ctx = pipeline.Context(Settings.from_env(lake_root=str(tmp_path / "lake"), landing_root=str(tmp_path / "landing")))
    est_id, est = next(iter(ctx.consortium.establishments.items()))
    folder = tmp_path / "landing" / est.landing_folder / "20260105-001"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    (folder / "patients.csv").write_text("a,b\n1,2\n")
    assert pipeline.landing_bytes(ctx, est_id, "20260105-001") == 2 + 8
    assert pipeline.landing_bytes(ctx, est_id, "20260112-002") is None  # gone: size unknown
    assert pipeline.landing_bytes(ctx, "nowhere", "20260105-001") is None
