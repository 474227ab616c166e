"""Shared fixtures: one SparkSession for the whole test session."""

from __future__ import annotations

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
