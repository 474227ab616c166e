"""Fixtures that stand up the distributed deployment's services on loopback.

* ``spark_cluster``: a Spark standalone master and one worker (1 core, 1g) from
  the pyspark distribution, for the whole test session;
* ``s3_server``: s3proxy with a filesystem backend and a test access key;
* :func:`run_spark_app` runs ``fn(ctx) -> dict`` (a function of an importable
  module) as its own Spark application, through the ``spark_default`` Airflow
  connection, exactly as a task of the deployed DAGs builds its session.

The applications run in subprocesses so that the suite's shared local session
is untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.background import lower_priority
from tests.conftest import TEST_KEY

ROOT = Path(__file__).resolve().parents[2]
SPARK_DEFAULTS = ROOT / "docker" / "spark-conf" / "spark-defaults.conf"
APP_TIMEOUT_SECONDS = 900  # a whole batch on a one-core worker; generous for a busy machine
BACKGROUND_APP_TIMEOUT_SECONDS = 2400


def loopback_spark_conf(conf_dir: Path, s3_endpoint: str | None = None) -> Path:
    """The deployment's ``spark-defaults.conf`` with the S3 endpoint and the driver moved to loopback."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in SPARK_DEFAULTS.read_text().splitlines():
        if s3_endpoint and line.split(maxsplit=1)[:1] == ["spark.hadoop.fs.s3a.endpoint"]:
            line = f"spark.hadoop.fs.s3a.endpoint {s3_endpoint}"
        lines.append(line)
    lines += ["spark.driver.host 127.0.0.1", "spark.driver.bindAddress 127.0.0.1"]
    (conf_dir / "spark-defaults.conf").write_text("\n".join(lines) + "\n")
    return conf_dir


class SparkApp:
    """One Spark application running in its own subprocess (:func:`launch_spark_app`); :meth:`result` waits for it."""

    def __init__(self, target: str, work_dir: Path, process: subprocess.Popen, timeout: float):
        self.target, self.work_dir, self.process, self.timeout = target, work_dir, process, timeout
        self.deadline = time.monotonic() + timeout

    def result(self) -> dict:
        """The function's result plus the master URL and application id; an AssertionError naming the log."""
        from tests.deployment.app import RESULT_PREFIX

        try:
            self.process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
            timed_out = False
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            timed_out = True
        stdout = (self.work_dir / "app.stdout").read_text(errors="replace")
        stderr = (self.work_dir / "app.stderr").read_text(errors="replace")
        (self.work_dir / "app.log").write_text(stdout + "\n--- stderr ---\n" + stderr)
        if timed_out:
            raise AssertionError(f"Spark application {self.target} did not finish in {self.timeout:.0f} s; "
                                 f"log in {self.work_dir / 'app.log'}:\n{stderr[-3000:]}")
        results = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if self.process.returncode != 0 or not results:
            raise AssertionError(f"Spark application {self.target} failed (exit {self.process.returncode}); "
                                 f"log in {self.work_dir / 'app.log'}:\n{stderr[-4000:]}")
        return json.loads(results[-1].removeprefix(RESULT_PREFIX))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def launch_spark_app(target: str | Callable, *, connection_uri: str, lake_root: str, work_dir: Path,
                     s3_endpoint: str | None = None, extra_env: dict[str, str] | None = None,
                     background: bool = False) -> SparkApp:
    """Start ``target`` (``"module:function"`` or the function itself) as its own Spark application.

    The application's master comes from ``AIRFLOW_CONN_SPARK_DEFAULT=connection_uri``;
    its lake root from ``AFFLUENT_LAKE_ROOT=lake_root``. ``background`` runs it at a lower
    CPU priority (tests/background.py).
    """
    if callable(target):
        target = f"{target.__module__}:{target.__qualname__}"
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("AIRFLOW", "AFFLUENT_", "SPARK_", "PYSPARK_", "AWS_"))}
    env.update({
        "AIRFLOW_HOME": str(work_dir / "airflow"),
        "AIRFLOW_CONN_SPARK_DEFAULT": connection_uri,
        "AFFLUENT_LAKE_ROOT": lake_root,
        "AFFLUENT_PSEUDONYM_KEY": TEST_KEY,
        "AFFLUENT_DRIVER_MEMORY": "1g",
        "AFFLUENT_SHUFFLE_PARTITIONS": "2",
        # The suite's Spark execution mode (tests/conftest.py), on the cluster's executors too.
        "AFFLUENT_SPARK_CODEGEN": os.environ.get("AFFLUENT_SPARK_CODEGEN", "on"),
        "AFFLUENT_SPARK_ADAPTIVE": os.environ.get("AFFLUENT_SPARK_ADAPTIVE", "on"),
        "SPARK_CONF_DIR": str(loopback_spark_conf(work_dir / "spark-conf", s3_endpoint)),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
    })
    env.update(extra_env or {})
    # Output goes to files, not pipes: an application left running in the background must never
    # block on a full pipe nobody reads yet.
    with (work_dir / "app.stdout").open("wb") as out, (work_dir / "app.stderr").open("wb") as err:
        command = [sys.executable, "-m", "tests.deployment.app", target]
        process = subprocess.Popen(lower_priority(command) if background else command, cwd=ROOT, env=env,
                                   stdout=out, stderr=err)
    # In the background it gets the cores the foreground tests leave: it may take longer.
    timeout = BACKGROUND_APP_TIMEOUT_SECONDS if background else APP_TIMEOUT_SECONDS
    return SparkApp(target, work_dir, process, timeout)


def run_spark_app(target: str | Callable, **kwargs) -> dict:
    """:func:`launch_spark_app`, then wait for its result (the function's result, master URL, application id)."""
    return launch_spark_app(target, **kwargs).result()


# The cluster application (tests/deployment/test_spark_cluster.py) is the suite's slowest single
# step and needs nothing from the other tests: when the session selects it, the cluster and the
# application start as soon as collection ends (tests/conftest.py), and its tests run near the end.
_early: dict = {}


def _launch_cluster_app(cluster, tmp_path_factory, background: bool) -> tuple[SparkApp, str]:
    """The application that runs a batch through every stage on ``cluster``, then a Delta write/read/MERGE."""
    from tests.deployment.workloads import batch_then_delta_checks

    work = tmp_path_factory.mktemp("cluster-app")
    lake_root = str(work / "lake")
    app = launch_spark_app(batch_then_delta_checks, connection_uri=cluster.connection_uri, lake_root=lake_root,
                           work_dir=work / "app", background=background)
    return app, lake_root


def start_cluster_app_early(tmp_path_factory) -> None:
    from tests.deployment.cluster import start_standalone_cluster

    _early["cluster"] = start_standalone_cluster(tmp_path_factory.mktemp("spark-cluster"), workers=1,
                                                 worker_cores=1, worker_memory="1g", background=True)
    _early["app"], _early["lake_root"] = _launch_cluster_app(_early["cluster"], tmp_path_factory, background=True)


def cluster_app_result(cluster, tmp_path_factory) -> tuple[dict, str]:
    """The cluster application's result and lake root: the one started early, else one run now."""
    if "app" in _early:
        return _early["app"].result(), _early["lake_root"]
    app, lake_root = _launch_cluster_app(cluster, tmp_path_factory, background=False)
    return app.result(), lake_root


def stop_early() -> None:
    if "app" in _early:
        _early.pop("app").stop()
    if "cluster" in _early:
        _early.pop("cluster").stop()


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory):
    from tests.deployment.cluster import start_standalone_cluster

    if "cluster" in _early:
        yield _early["cluster"]  # stopped when the session ends
        return
    with start_standalone_cluster(tmp_path_factory.mktemp("spark-cluster"), workers=1,
                                  worker_cores=1, worker_memory="1g") as cluster:
        print(f"Spark standalone master: {cluster.master_url} (UI {cluster.webui_url})")
        yield cluster


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from tests.deployment.cluster import start_s3proxy

    with start_s3proxy(tmp_path_factory.mktemp("s3proxy"), access_key="affluent-test-access",
                       secret_key="affluent-test-secret-0123456789") as server:
        print(f"S3 server (s3proxy): {server.endpoint}")
        yield server
