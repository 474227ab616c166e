"""The quick start's first command, run once for every integration test.

``affluent demo`` generates a small consortium (with injected defects and its
ground truth), runs every establishment's ingest DAG for each batch and the
publish DAG through Airflow (``dag.test`` on SQLite, every task a client of
the Spark service the demo starts and stops), then
starts the researcher gateway. The tests of ``test_airflow_e2e.py`` check what
the demo printed and how Airflow re-runs a batch; those of
``test_consortium.py`` check the lake it left against the generator's ground
truth. One run serves both: it is the slowest part of the suite, so it starts
in the background when the session starts (``tests/conftest.py``) and the
tests that need it run last.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.background import lower_priority
from tests.conftest import TEST_KEY

ROOT = Path(__file__).resolve().parents[2]
PATIENTS, BATCHES, SEED, DEFECT_RATE = 120, 2, 11, 0.05


@dataclass(frozen=True)
class DemoRun:
    workdir: Path
    stdout: str

    @property
    def lake_root(self) -> Path:
        return self.workdir / "lake"

    @property
    def generated(self) -> Path:
        """The generator's output: ``landing/`` and ``ground_truth/``."""
        return self.workdir / "consortium"


def demo_env() -> dict[str, str]:
    """The test's environment for a demo subprocess, without the caller's Airflow settings."""
    env = dict(os.environ, AFFLUENT_PSEUDONYM_KEY=TEST_KEY, AFFLUENT_SHUFFLE_PARTITIONS="2",
               AFFLUENT_DRIVER_MEMORY="2g")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The demo runs as `make demo` does: every task a client of the Spark service it starts (the suite's
    # classic default is for the tests' own Spark).
    for name in list(env):
        if name.startswith("AIRFLOW") or name in ("AFFLUENT_LAKE_ROOT", "AFFLUENT_LANDING_ROOT", "AFFLUENT_SPARK_MODE",
                                                  "AFFLUENT_SPARK_REMOTE", "AFFLUENT_SPARK_TOKEN"):
            del env[name]
    return env


class DemoLaunch:
    """The demo subprocess, started as soon as the session knows a test needs it.

    It runs in its own process (its own Spark, its own Airflow database) while
    the rest of the suite runs; the tests that read it are moved to the end of
    the session, so by the time they ask for it most of it is done.
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.stdout_path = workdir / "demo.stdout"
        self.stderr_path = workdir / "demo.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                lower_priority([sys.executable, "-m", "jobs.app.cli", "demo", "--patients", str(PATIENTS),
                                "--batches", str(BATCHES), "--seed", str(SEED), "--defect-rate", str(DEFECT_RATE),
                                "--workdir", str(workdir)]),
                # Its own service (state folder, free port), never one this machine runs already.
                cwd=ROOT, env=demo_env() | {"AFFLUENT_SPARK_STATE": str(workdir / "spark-service")}, stdout=out,
                stderr=err)

    def result(self, timeout: float = 2400) -> DemoRun:
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        stdout = self.stdout_path.read_text(encoding="utf-8", errors="replace")
        stderr = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        assert returncode == 0, stdout[-3000:] + stderr[-3000:]
        return DemoRun(self.workdir, stdout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


_launch: DemoLaunch | None = None


def start_demo(workdir: Path) -> DemoLaunch:
    global _launch
    if _launch is None:
        _launch = DemoLaunch(workdir)
    return _launch


def stop_demo() -> None:
    if _launch is not None:
        _launch.stop()


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> DemoRun:
    launch = _launch or start_demo(tmp_path_factory.mktemp("demo"))
    return launch.result()
