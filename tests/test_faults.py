"""Faults of a delivery or a run end in the batch log, with what the steward sees, never in a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from jobs.stages.batch_queue import batch_log_entries, establishment_queue
from jobs.core.batchlog import BatchRejected, QueueState, Stage, Status
from jobs.core.lake import Lake
from jobs.stages.landing import MANIFEST_NOT_A_FILE
from tests.conftest import TEST_KEY
from tests.landing_helpers import LAURENTIDES_PATIENT_HEADER, latin1_csv, write_batch

EST = "chu_laurentides"
PATIENTS = [
    "L001;TREM85521512;Tremblay;Éloïse;12/02/1985;F;12 rue des Érables;Montréal;H2X 1Y4;514-555-0101;e@x.ca;;A",
    "L002;GAGL90010112;Gagnon;Luc;01/01/1990;M;3 av. du Parc;Laval;H7N 2B3;450-555-0102;l@x.ca;;A",
]


def deliver(landing, batch_id: str, content: bytes | None = None):
    content = latin1_csv(LAURENTIDES_PATIENT_HEADER, PATIENTS) if content is None else content
    return write_batch(landing, EST, batch_id, {"patients.csv": ("patient", content)})


@pytest.fixture()
def flow(spark, consortium, tmp_path, monkeypatch):
    """A pipeline context on its own lake and landing folder, as the CLI and the DAGs build it."""
    from jobs.stages import pipeline
    from jobs.core.settings import Settings

    lake, landing = tmp_path / "lake", tmp_path / "landing"
    for name, value in {"AFFLUENT_LAKE_ROOT": str(lake), "AFFLUENT_LANDING_ROOT": str(landing),
                        "AFFLUENT_PSEUDONYM_KEY": TEST_KEY}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AFFLUENT_PSEUDONYM_KEY_FILE", raising=False)
    ctx = pipeline.Context(Settings.from_env())
    ctx.__dict__["consortium"] = consortium
    return ctx


def steward_sees(capsys) -> str:
    """What `affluent batches` prints for the establishment."""
    from jobs.app import cli

    capsys.readouterr()
    assert cli.main(["batches", "--establishment", EST]) == 0
    return capsys.readouterr().out


def rejected_entries(lake: Lake, batch_id: str) -> list[dict]:
    return [e for e in batch_log_entries(lake, EST) if e["batch_id"] == batch_id and e["status"] == Status.REJECTED]


def test_a_manifest_that_is_a_directory_is_rejected_in_the_log_and_earlier_batches_still_land(flow, capsys):
    from jobs.stages import pipeline

    landing = flow.settings.landing
    deliver(landing, "20260105-001")
    broken = deliver(landing, "20260106-001")
    deliver(landing, "20260107-001")
    (broken / "manifest.json").unlink()
    (broken / "manifest.json").mkdir()

    # The queue is read without an error: the broken batch is delivered, waiting for its turn.
    queue = pipeline.queue(flow, EST)
    assert queue.pending == ["20260105-001", "20260106-001", "20260107-001"]
    landed = pipeline.run_batch(flow, EST, "20260105-001")  # land reads the queue (delivery order) too
    assert landed["land"]["landed"] == {"patient": 2}

    with pytest.raises(BatchRejected, match="manifest.json is a directory"):
        pipeline.ingest(flow, EST, "20260106-001")
    [entry] = rejected_entries(flow.lake, "20260106-001")
    assert (entry["stage"], entry["source_file"], entry["manifest_sha256"]) == (
        Stage.INGEST, "manifest.json", MANIFEST_NOT_A_FILE)
    queue = pipeline.queue(flow, EST)
    assert queue.state_of("20260105-001").state == QueueState.LANDED
    assert queue.blocked_by.batch_id == "20260106-001" and queue.held_back == ["20260107-001"]
    seen = steward_sees(capsys)
    assert "queue blocked by 20260106-001, blocked at ingest (file manifest.json)" in seen
    assert "manifest.json is a directory" in seen and "affluent batch skip" in seen

    # The establishment replaces it with its manifest: the batch is taken again.
    shutil.rmtree(broken / "manifest.json")
    deliver(landing, "20260106-001")
    assert pipeline.queue(flow, EST).pending == ["20260106-001", "20260107-001"]


@pytest.mark.parametrize("kind", ["link", "pipe"])
def test_a_manifest_that_is_a_link_or_a_pipe_is_rejected_without_being_read(tmp_path, consortium, kind):
    from jobs.stages.landing import check_batch

    folder = deliver(tmp_path, "20260105-001")
    elsewhere = tmp_path / "manifest-elsewhere.json"
    (folder / "manifest.json").rename(elsewhere)
    if kind == "link":
        (folder / "manifest.json").symlink_to(elsewhere)
    else:
        os.mkfifo(folder / "manifest.json")  # reading a pipe would wait for ever
    queue = establishment_queue(Lake(str(tmp_path / "lake")), tmp_path, consortium, EST)
    assert queue.pending == ["20260105-001"]
    with pytest.raises(BatchRejected, match=f"manifest.json is {'a link' if kind == 'link' else 'not a regular'}"):
        check_batch(tmp_path, consortium, EST, "20260105-001")


def test_an_empty_csv_file_is_rejected_with_a_clear_rule_and_is_taken_again_once_delivered(flow, capsys):
    """A 0-byte CSV has no header: an export that failed, not an empty one (in a full batch it would delete
    every record). It stops its batch like any rejection; a fixed delivery is taken again."""
    from jobs.stages import pipeline

    landing = flow.settings.landing
    folder = deliver(landing, "20260105-001", content=b"")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][0]["rows"] = 0  # what an exporter that failed announces
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BatchRejected, match=r"is empty \(0 bytes\)") as rejected:
        pipeline.ingest(flow, EST, "20260105-001")
    assert "-1" not in str(rejected.value)
    [entry] = rejected_entries(flow.lake, "20260105-001")
    assert entry["source_file"] == "20260105-001#0" and "its header line, even with no row" in entry["message"]
    seen = steward_sees(capsys)
    assert "queue blocked by 20260105-001" in seen and "is empty (0 bytes)" in seen

    # The establishment sends the header alone (nothing to send): a new manifest, taken again, 0 rows.
    deliver(landing, "20260105-001", content=latin1_csv(LAURENTIDES_PATIENT_HEADER, []))
    assert json.loads((folder / "manifest.json").read_text())["files"][0]["rows"] == 0
    assert pipeline.queue(flow, EST).pending == ["20260105-001"]
    assert pipeline.ingest(flow, EST, "20260105-001")["bronze"] == {"patient": 0}


def test_an_empty_or_broken_bundle_is_named_as_such(tmp_path, consortium):
    from jobs.stages.landing import check_batch

    est = "cisss_estuaire"
    for content, reason in [(b"", r"is empty \(0 bytes\).*a JSON Bundle"), (b"[1, 2]", "is not a JSON Bundle")]:
        write_batch(tmp_path, est, "20260105-001", {"bundle.json": ("bundle", content)},
                    manifest_overrides={"files": [{"dataset": "bundle", "path": "bundle.json", "rows": 0,
                                                   "sha256": hashlib.sha256(content).hexdigest()}]})
        with pytest.raises(BatchRejected, match=reason):
            check_batch(tmp_path, consortium, est, "20260105-001")


def test_a_second_run_of_a_running_batch_says_already_running_in_the_log_and_changes_nothing(flow, capsys):
    import threading

    from jobs.app import cli

    from jobs.stages import pipeline
    from jobs.core.writer_lock import batch_run

    deliver(flow.settings.landing, "20260105-001")
    holding, leave = threading.Event(), threading.Event()

    def first_run():  # holds the batch as a running `affluent run` or DAG run does
        with batch_run(flow.lake.root, EST, "20260105-001", "run_batch"):
            holding.set()
            leave.wait(60)

    runner = threading.Thread(target=first_run)
    runner.start()
    try:
        assert holding.wait(30)
        assert cli.main(["run", "--establishment", EST, "--batch", "20260105-001"]) == 1
        said = capsys.readouterr().err
        assert "already running (run_batch (exclusive, pid" in said and "changed nothing" in said
        [entry] = [e for e in batch_log_entries(flow.lake, EST) if e["batch_id"] == "20260105-001"]
        assert (entry["stage"], entry["status"]) == (Stage.RUN, Status.ALREADY_RUNNING)
        assert not Path(flow.lake.bronze("patient")).exists()  # the second run wrote nothing
        seen = steward_sees(capsys)
        assert "already_running" in seen and "queue moving, next batch 20260105-001" in seen
    finally:
        leave.set()
        runner.join()
    # Once the first run has ended, the batch is taken as usual.
    assert pipeline.ingest(flow, EST, "20260105-001")["bronze"] == {"patient": 2}


def test_a_death_before_birth_is_quarantined_for_plausibility_and_the_rest_of_the_batch_goes_on(flow, capsys):
    from pyspark.sql import functions as F

    from jobs.stages import pipeline

    dead_before_born = PATIENTS[1].replace(";;A", ";15/03/1989;A")  # born 01/01/1990
    dead_after_born = PATIENTS[0].replace(";;A", ";02/02/2024;A")
    deliver(flow.settings.landing, "20260105-001", latin1_csv(LAURENTIDES_PATIENT_HEADER,
                                                              [dead_after_born, dead_before_born]))
    for stage in ("ingest", "pseudonymise", "validate"):
        getattr(pipeline, stage)(flow, EST, "20260105-001")

    spark = flow.spark
    [row] = spark.read.format("delta").load(flow.lake.quarantine()).where(F.col("stage") == "validate").collect()
    assert (row.dataset, row.rule, row.reason) == ("patient", "plausibility.date_order",
                                                    "deceased_date: death before birth")
    assert "1989" not in row.record_safe and "Gagnon" not in row.record_safe
    [kept] = spark.read.format("delta").load(flow.lake.validated("patient")).collect()
    assert kept.is_deceased and kept.year_of_birth == 1985
    [entry] = [e for e in batch_log_entries(flow.lake, EST) if e["stage"] == Stage.VALIDATE]
    assert (entry["status"], entry["rows_read"], entry["rows_quarantined"]) == (Status.VALIDATED, 2, 1)
    seen = steward_sees(capsys)
    assert "queue moving, next batch 20260105-001" in seen  # one implausible row does not stop the batch
