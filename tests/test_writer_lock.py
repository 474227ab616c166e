"""The lake's writer lock: ordinary writers together, erasure and VACUUM alone, across threads and processes."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.core.writer_lock import (ENV_LOCK_DIR, LakeBusy, Mode, NoLockFolder, exclusive, holders, lake_writer, lock_path,
                              shared)

ROOT = Path(__file__).resolve().parents[1]


def _in_thread(lake: str, mode: Mode, what: str, entered: threading.Event, leave: threading.Event,
               errors: list) -> threading.Thread:
    def body():
        try:
            with lake_writer(lake, mode, what, timeout=30):
                entered.set()
                leave.wait(30)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_ordinary_writers_share_the_lock(tmp_path):
    lake = str(tmp_path / "lake")
    first, leave, errors = threading.Event(), threading.Event(), []
    holder = _in_thread(lake, Mode.SHARED, "ingest A", first, leave, errors)
    assert first.wait(10)
    with shared(lake, "land B"):  # does not wait for ingest A
        assert {h["what"] for h in holders(lock_path(lake))} == {"ingest A", "land B"}
    leave.set()
    holder.join(10)
    assert not errors
    assert holders(lock_path(lake)) == []  # each holder's record goes with it


def test_erasure_waits_for_the_writers_and_names_them(tmp_path, caplog):
    lake = str(tmp_path / "lake")
    entered, leave, errors = threading.Event(), threading.Event(), []
    writer = _in_thread(lake, Mode.SHARED, "land chu_x/b2", entered, leave, errors)
    assert entered.wait(10)
    with pytest.raises(LakeBusy, match=r"land chu_x/b2 \(shared, pid \d+"):
        with exclusive_for(lake, "erasure", timeout=0.5):
            pass
    caplog.set_level(logging.INFO, logger="jobs.core.writer_lock")
    got = threading.Event()

    def erase():
        with lake_writer(lake, Mode.EXCLUSIVE, "erasure", timeout=30):
            got.set()
    eraser = threading.Thread(target=erase, daemon=True)
    eraser.start()
    assert not got.wait(1.0)  # the land still holds the lock
    assert "erasure waits for the lake writer lock (exclusive) held by land chu_x/b2" in caplog.text
    leave.set()
    assert got.wait(10)
    eraser.join(10)
    writer.join(10)
    assert not errors


def exclusive_for(lake: str, what: str, timeout: float):
    return lake_writer(lake, Mode.EXCLUSIVE, what, timeout=timeout)


def test_no_writer_starts_while_erasure_holds_the_lock(tmp_path):
    lake = str(tmp_path / "lake")
    entered, leave, errors = threading.Event(), threading.Event(), []
    eraser = _in_thread(lake, Mode.EXCLUSIVE, "erasure", entered, leave, errors)
    assert entered.wait(10)
    with pytest.raises(LakeBusy, match=r"held after 0 s by erasure \(exclusive"):
        with lake_writer(lake, Mode.SHARED, "ingest", timeout=0.3):
            pass
    leave.set()
    eraser.join(10)
    with shared(lake, "ingest"):
        pass
    assert not errors


def test_another_process_holding_the_lock_is_waited_for(tmp_path):
    lake = str(tmp_path / "lake")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom jobs.core.writer_lock import exclusive\n"
         f"with exclusive({lake!r}, 'maintenance VACUUM'):\n    print('held', flush=True)\n    time.sleep(2)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LakeBusy, match="maintenance VACUUM"):
            with lake_writer(lake, Mode.SHARED, "land", timeout=0.3):
                pass
        started = time.monotonic()
        with lake_writer(lake, Mode.SHARED, "land", timeout=30):
            waited = time.monotonic() - started
        assert waited > 0.5  # it waited for the other process to let go, then went on
    finally:
        holder.wait(10)
    assert holder.returncode == 0


def test_the_lock_is_reentrant_within_a_thread(tmp_path):
    lake = str(tmp_path / "lake")
    with exclusive(lake, "erasure"):
        with shared(lake, "publish inside erasure"):  # no self-deadlock
            with exclusive(lake, "vacuum inside erasure"):
                pass
    with shared(lake, "land"):
        with pytest.raises(RuntimeError, match="holds it shared"):
            with exclusive(lake, "vacuum inside land"):
                pass


def test_a_lake_on_object_storage_needs_a_shared_lock_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_LOCK_DIR, raising=False)
    with pytest.raises(NoLockFolder, match=ENV_LOCK_DIR):
        lock_path("s3a://affluent-lake/lake")
    monkeypatch.setenv(ENV_LOCK_DIR, str(tmp_path / "locks"))
    assert lock_path("s3a://affluent-lake/lake") == tmp_path / "locks" / "writers.lock"
    with exclusive("s3a://affluent-lake/lake", "erasure"):
        assert (tmp_path / "locks" / "writers.lock").exists()


def test_every_lake_writing_job_holds_the_lock():
    from jobs.privacy import erasure
    from jobs.stages import ingest, land, maintenance, pseudonymise, publish, validate

    expected = {ingest.ingest_batch: Mode.SHARED, pseudonymise.pseudonymise_batch: Mode.SHARED,
                validate.validate_batch: Mode.SHARED, land.land_batch: Mode.SHARED,
                maintenance.purge_transient: Mode.SHARED, publish.publish: Mode.SHARED,
                erasure.request_erasure: Mode.SHARED, erasure.process_erasures: Mode.EXCLUSIVE,
                maintenance.purge_bronze: Mode.EXCLUSIVE, maintenance.compact_and_vacuum: Mode.EXCLUSIVE,
                maintenance.purge_transient_zones: Mode.EXCLUSIVE}
    for fn, mode in expected.items():
        assert getattr(fn, "lake_lock_mode", None) == mode, fn.__qualname__


def test_erasure_and_a_land_run_concurrently_and_lose_nothing(spark, erased_during_land):
    """Erasure (DELETE, log clean-up, VACUUM RETAIN 0) and a land MERGE at once, on one lake: one waits."""
    from pyspark.sql import functions as F

    from jobs.privacy.erasure import patient_key_of
    from jobs.privacy.keys import load_key
    from jobs.stages.land import batch_figures
    from tests.conftest import TEST_KEY
    from tests.privacy_helpers import EST

    run = erased_during_land
    lake, key = run["lake"], load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)
    assert not run["errors"], run["errors"]
    assert "jobs.stages.land.land_batch waits for the lake writer lock (shared) held by jobs.privacy.erasure.process_erasures" \
        in run["lock_log"]
    assert run["outcomes"]["erasure"].processed
    silver = spark.read.format("delta").load(lake.silver("patient"))
    keys = {r.patient_key for r in silver.select("patient_key").collect()}
    assert patient_key_of(key, EST, "L004") in keys  # the land is whole
    assert patient_key_of(key, EST, "L002") in keys
    assert patient_key_of(key, EST, "L001") not in keys  # the erasure too
    figures = batch_figures(spark, lake, EST, run["second"])["patient"]
    assert (figures.read, figures.landed) == (1, 1)
    for dataset in ("patient", "encounter", "lab_result", "consent"):  # every file each table lists is there
        spark.read.format("delta").load(lake.silver(dataset)).where(F.lit(True)).count()
