"""Shared fixtures: one SparkSession for the whole test session."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

TEST_KEY = "0123456789abcdef" * 4  # throwaway 32-byte test key (hex), never used outside tests
OTHER_TEST_KEY = "fedcba9876543210" * 4
# Official HL7 FHIR R4 examples (CC0), copied into the repository: see tests/fixtures/README.md.
FHIR_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hl7-fhir-r4-examples"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
# A fixed "today" inside every shipped project's validity window, so that the
# suite gives the same answer whatever the calendar says (jobs.clock); it is
# inherited by the demo and benchmark subprocesses the tests start.
FIXED_TODAY = "2026-06-15"
os.environ["AFFLUENT_TODAY"] = FIXED_TODAY


def pytest_collection_modifyitems(session, config, items):
    """Tests that read the demo run last: the demo runs in the background meanwhile."""
    items.sort(key=lambda item: "demo" in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session):
    """Start the demo subprocess at once when a selected test needs it (tests/integration/conftest.py)."""
    if session.config.option.collectonly or not any("demo" in getattr(item, "fixturenames", ())
                                                    for item in session.items):
        return
    from tests.integration.conftest import start_demo

    start_demo(session.config._tmp_path_factory.mktemp("demo"))  # noqa: SLF001 - pytest's own tmp_path_factory


def pytest_sessionfinish(session, exitstatus):
    from tests.integration.conftest import stop_demo

    stop_demo()


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from jobs.session import get_spark
    from jobs.settings import Settings

    os.environ.setdefault("AFFLUENT_SHUFFLE_PARTITIONS", "2")
    warehouse = tmp_path_factory.mktemp("warehouse")
    settings = Settings.from_env(lake_root=str(warehouse / "lake"), spark_master="local[2]")
    # An uncompressed event log, so that tests can check what plans print (no key, no identifier).
    event_log = warehouse / "event-log"
    event_log.mkdir()
    session = get_spark(settings, app_name="affluent-tests",
                        extra_conf={"spark.sql.warehouse.dir": str(warehouse / "spark-warehouse"),
                                    "spark.eventLog.enabled": "true", "spark.eventLog.dir": str(event_log),
                                    "spark.eventLog.compress": "false"})
    yield session
    session.stop()


@pytest.fixture()
def lake_root(tmp_path) -> str:
    return str(tmp_path / "lake")


@pytest.fixture(scope="session")
def consortium():
    from jobs.config import load_consortium

    return load_consortium(CONFIG_DIR)


@pytest.fixture()
def pseudonym_key():
    from jobs.keys import load_key

    return load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)


@pytest.fixture(scope="session")
def planted_lake(spark, consortium, tmp_path_factory) -> Path:
    """The planted batch (tests/privacy_helpers.py) through every stage, then published; built once, read only.

    Returns the folder holding ``lake/`` and ``landing/``. A test that changes
    the lake (erasure) works on its own copy (:func:`copy_lake`).
    """
    import datetime as dt

    from jobs.keys import load_key
    from jobs.lake import Lake
    from jobs.publish import publish
    from tests.privacy_helpers import run_batch, write_planted_batch

    key = load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)
    root = tmp_path_factory.mktemp("planted")
    lake = Lake(str(root / "lake"))
    write_planted_batch(root / "landing")
    run_batch(spark, lake, consortium, root / "landing", key)  # staged/ and validated/ still hold the batch
    publish(spark, lake, consortium, key, dt.date.fromisoformat(FIXED_TODAY))
    return root


def copy_lake(source: Path, target: Path) -> Path:
    """A copy of a lake folder: Delta tables keep relative file paths, so the copy is a lake of its own."""
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def erased_history(spark, tmp_path_factory):
    """A small silver history (tests/test_publish.py) published, then one person erased; built once, read only."""
    from jobs.config import load_consortium
    from jobs.erasure import patient_key_of, process_erasures, request_erasure
    from jobs.keys import load_key
    from jobs.lake import Lake
    from jobs.publish import publish
    from jobs.schemas import QUARANTINE_SCHEMA
    from tests.test_erasure import VICTIM, VICTIM_REF
    from tests.test_publish import C, FIRST, build_history, config_copy, hmac_hex, person, write_silver

    key = load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)
    tmp = tmp_path_factory.mktemp("erasure")
    consortium = load_consortium(config_copy(tmp))
    lake = Lake(str(tmp / "lake"))
    rows, _ = build_history()
    victim = person(VICTIM)
    rows["patient"] = [r[:2] + ((patient_key_of(key, r[1], VICTIM_REF),) if r[0] == victim else (r[2],)) + r[3:]
                       for r in rows["patient"]]
    write_silver(spark, lake, rows)
    now = dt.datetime(2026, 2, 1)
    spark.createDataFrame([(C, "b1", "diagnosis", "validate", "code", "unknown code", "f.csv", 3, None, victim, "{}", now),
                           (C, "b1", "diagnosis", "validate", "code", "unknown code", "f.csv", 4, None, person(6), "{}", now)],
                          QUARANTINE_SCHEMA).write.format("delta").save(lake.quarantine())
    publish(spark, lake, consortium, key, FIRST)
    pseudonyms = {p: hmac_hex(key.project_key(p), victim) for p in consortium.projects}
    before = {p: s for p, s in pseudonyms.items()
              if s in {r.person_id for r in spark.read.format("delta").load(lake.project(p, "patient")).collect()}}
    request_id = request_erasure(spark, lake, key, C, VICTIM_REF)
    assert request_erasure(spark, lake, key, C, VICTIM_REF) == request_id  # asked twice: one request
    unknown_id = request_erasure(spark, lake, key, C, "MRN-never-landed")
    outcome = process_erasures(spark, lake, consortium, key)
    return {"lake": lake, "key": key, "victim": victim, "pseudonyms": pseudonyms, "before": before,
            "request_id": request_id, "unknown_id": unknown_id, "outcome": outcome, "root": Path(lake.root),
            "consortium": consortium}
