"""Shared fixtures: one SparkSession for the whole test session."""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

import pytest

TEST_KEY = "0123456789abcdef" * 4  # throwaway 32-byte test key (hex), never used outside tests
OTHER_TEST_KEY = "fedcba9876543210" * 4
# Official HL7 FHIR R4 examples (CC0), copied into the repository: see tests/fixtures/README.md.
FHIR_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hl7-fhir-r4-examples"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
# A fixed "today" inside every shipped project's validity window, so that the
# suite gives the same answer whatever the calendar says (jobs.core.clock); it is
# inherited by the demo and benchmark subprocesses the tests start.
FIXED_TODAY = "2026-06-15"
os.environ["AFFLUENT_TODAY"] = FIXED_TODAY
# Tests run on a few hundred rows, where compiling Spark's generated code (and JIT-compiling it)
# costs more than it saves, and where adaptive execution has nothing to adapt to but re-plans
# every query after each of its shuffle stages: the suite and the subprocesses it starts run
# Spark interpreted and planned once (jobs.core.session.ENV_CODEGEN, ENV_ADAPTIVE). Checks whose
# result must not depend on them run both ways (tests/test_session.py, tests/test_kanonymity.py).
# AFFLUENT_SPARK_CODEGEN=on AFFLUENT_SPARK_ADAPTIVE=on runs the suite as production runs.
os.environ.setdefault("AFFLUENT_SPARK_CODEGEN", "off")
os.environ.setdefault("AFFLUENT_SPARK_ADAPTIVE", "off")
# Two shuffle partitions everywhere in the suite, in-process and in the subprocesses it starts, whatever a
# batch's size (the small-batch mode's one partition is checked by tests/test_session.py): rows spread over
# more than one partition keep order-dependent mistakes visible.
os.environ.setdefault("AFFLUENT_SHUFFLE_PARTITIONS", "2")
# Commands run their Spark in-process here (the session fixture's, or their own in a subprocess):
# a test that wants the Spark service starts one of its own (tests/test_spark_service.py) and
# says so, rather than every `affluent run` of the suite sharing whatever service this machine runs.
os.environ.setdefault("AFFLUENT_SPARK_MODE", "classic")


# Fixtures whose work runs in subprocesses started when collection ends; their tests run last.
BACKGROUND_FIXTURES = ("cluster_run", "demo")


def _background_rank(item) -> int:
    names = getattr(item, "fixturenames", ())
    return next((rank for rank, name in enumerate(BACKGROUND_FIXTURES, 1) if name in names), 0)


def pytest_collection_modifyitems(session, config, items):
    """Tests that read the cluster application or the demo run last: both run in the background meanwhile."""
    items.sort(key=_background_rank)


def pytest_collection_finish(session):
    """Start the demo and the cluster application at once when a selected test needs them."""
    if session.config.option.collectonly:
        return
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    factory = session.config._tmp_path_factory  # noqa: SLF001 - pytest's own tmp_path_factory
    if "demo" in used:
        from tests.integration.conftest import start_demo

        start_demo(factory.mktemp("demo"))
    if "cluster_run" in used:
        from tests.deployment.cluster import ServiceStartError
        from tests.deployment.conftest import start_cluster_app_early

        try:
            start_cluster_app_early(factory)
        except ServiceStartError:
            pass  # the fixtures start it again in the foreground and report the failure there


def pytest_sessionfinish(session, exitstatus):
    from tests.deployment.conftest import stop_early
    from tests.integration.conftest import stop_demo

    stop_demo()
    stop_early()


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """The suite's one Spark service, as ``affluent spark start`` leaves it: its own state folder, port and
    event log, holding the test key, logging at INFO (a key in any log line would show). Tests that stop it
    start it again on the same port with the same token, as an operator would."""
    from jobs.core import spark_service
    from jobs.core.session import close_clients

    folder = tmp_path_factory.mktemp("spark-service")
    env = {"AFFLUENT_PSEUDONYM_KEY": TEST_KEY, spark_service.ENV_EVENT_LOG: str(folder / "event-log"),
           "AFFLUENT_SPARK_LOG_LEVEL": "INFO"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        state = spark_service.start(folder / "state", port=_free_port())
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    yield state
    if spark_service.read_state(folder / "state") is not None:
        close_clients()
    spark_service.stop(folder / "state")
    os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)  # the rest of the session runs classic


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from jobs.core.session import get_spark
    from jobs.core.settings import Settings

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
    from jobs.core.config import load_consortium

    return load_consortium(CONFIG_DIR)


@pytest.fixture()
def pseudonym_key():
    from jobs.privacy.keys import load_key

    return load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)


@pytest.fixture(scope="session")
def planted_lake(spark, consortium, tmp_path_factory) -> Path:
    """The planted batch (tests/privacy_helpers.py) through every stage, then published; built once, read only.

    Returns the folder holding ``lake/`` and ``landing/``. A test that changes
    the lake (erasure) works on its own copy (:func:`copy_lake`).
    """
    import datetime as dt

    from jobs.privacy.keys import load_key
    from jobs.core.lake import Lake
    from jobs.stages.publish import publish
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
    from jobs.core.config import load_consortium
    from jobs.privacy.erasure import patient_key_of, process_erasures, request_erasure
    from jobs.privacy.keys import load_key
    from jobs.core.lake import Lake
    from jobs.stages.publish import publish
    from jobs.core.schemas import QUARANTINE_SCHEMA
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


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="session")
def erased_during_land(spark, consortium, planted_lake, tmp_path_factory):
    """A copy of the planted lake where one person (L001) is erased while a second batch lands; built once, read only.

    The second batch (one new patient, L004) is ingested, pseudonymised and
    validated first; then erasure (DELETE, log clean-up, VACUUM RETAIN 0) runs
    in one thread and, once it holds the lake's exclusive writer lock, the
    batch's land in another. Before the erasure, the zones whose files hold the
    person are recorded, so that tests can check the scan finds them.
    """
    import threading
    import time

    from pyspark.sql import functions as F

    from jobs.privacy.erasure import patient_key_of, process_erasures, request_erasure
    from jobs.stages.ingest import ingest_batch
    from jobs.privacy.keys import load_key
    from jobs.core.lake import LANDING, Lake
    from jobs.stages.land import land_batch
    from jobs.stages.pseudonymise import pseudonymise_batch
    from jobs.stages.validate import validate_batch
    from jobs.core.writer_lock import holders, lock_path
    from tests.landing_helpers import LAURENTIDES_PATIENT_HEADER, latin1_csv, write_batch
    from tests.privacy_helpers import EST, file_text, hmac_hex, lake_files

    key = load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)
    tmp = tmp_path_factory.mktemp("erased-during-land")
    root = copy_lake(planted_lake / "lake", tmp / "lake")  # staged/ and validated/ still hold the planted batch
    lake = Lake(str(root))
    second = "20260112-002"
    write_batch(tmp / "landing", EST, second, {"patients.csv": ("patient", latin1_csv(
        LAURENTIDES_PATIENT_HEADER, ["L004;BEAL80010112;Beaulieu;Max;01/01/1980;M;1 rue A;Laval;H7N 2B3;;;;A"]))},
        extracted_at="2026-01-12T02:00:00Z", kind="incremental")
    kind = ingest_batch(spark, lake, tmp / "landing", consortium, EST, second).kind
    pseudonymise_batch(spark, lake, consortium, key, EST, second)
    validate_batch(spark, lake, consortium, EST, second, kind)

    patient_key = patient_key_of(key, EST, "L001")
    person_id = (spark.read.format("delta").load(lake.silver("patient"))
                 .where(F.col("patient_key") == patient_key).first().person_id)
    pseudonyms = [hmac_hex(key.project_key(p), person_id) for p in consortium.projects]
    in_clear = ["TREM85521201", "Quintalbert"]
    searched = [person_id, patient_key, *pseudonyms, *in_clear]
    holding_before = sorted({str(p.relative_to(root)).split("/")[0]
                             for p in lake_files(root, skip_zones=(LANDING,))
                             if any(i in file_text(p, spark) for i in searched)})
    request_erasure(spark, lake, key, EST, "L001")

    log = _Collect()
    logger = logging.getLogger("jobs.core.writer_lock")
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    errors: list[BaseException] = []
    outcomes: dict[str, object] = {}

    def run(name, fn):
        def body():
            try:
                outcomes[name] = fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the tests
                errors.append(exc)
        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    try:
        eraser = run("erasure", lambda: process_erasures(spark, lake, consortium, key))
        deadline = time.monotonic() + 60
        while not any(h["mode"] == "exclusive" for h in holders(lock_path(lake.root))):
            assert time.monotonic() < deadline and eraser.is_alive(), errors
            time.sleep(0.05)
        lander = run("land", lambda: land_batch(spark, lake, EST, second, key.fingerprint))
        eraser.join(600)
        lander.join(600)
    finally:
        logger.removeHandler(log)
        logger.setLevel(previous_level)
    return {"lake": lake, "root": root, "second": second, "errors": errors, "outcomes": outcomes,
            "lock_log": "\n".join(log.lines), "holding_before": holding_before, "person_id": person_id,
            "patient_key": patient_key, "pseudonyms": pseudonyms, "in_clear": in_clear}
