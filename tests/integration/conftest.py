"""The quick start's first command, run once for every integration test.

``affluent demo`` generates a small consortium (with injected defects and its
ground truth), runs every establishment's ingest DAG for each batch and the
publish DAG through Airflow (``dag.test`` on SQLite, its own Spark), then
starts the researcher gateway. The tests of ``test_airflow_e2e.py`` check what
the demo printed and how Airflow re-runs a batch; those of
``test_consortium.py`` check the lake it left against the generator's ground
truth. One run serves both: it is the slowest part of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

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
    for name in list(env):
        if name.startswith("AIRFLOW") or name in ("AFFLUENT_LAKE_ROOT", "AFFLUENT_LANDING_ROOT"):
            del env[name]
    return env


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> DemoRun:
    workdir = tmp_path_factory.mktemp("demo")
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "demo", "--patients", str(PATIENTS), "--batches", str(BATCHES),
         "--seed", str(SEED), "--defect-rate", str(DEFECT_RATE), "--workdir", str(workdir)],
        cwd=ROOT, env=demo_env(), capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return DemoRun(workdir, out.stdout)
