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
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TEST_KEY

ROOT = Path(__file__).resolve().parents[2]
SPARK_DEFAULTS = ROOT / "docker" / "spark-conf" / "spark-defaults.conf"
APP_TIMEOUT_SECONDS = 900  # a whole batch on a one-core worker; generous for a busy machine


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


def run_spark_app(target: str | Callable, *, connection_uri: str, lake_root: str, work_dir: Path,
                  s3_endpoint: str | None = None, extra_env: dict[str, str] | None = None) -> dict:
    """Run ``target`` (``"module:function"`` or the function itself) in its own Spark application.

    The application's master comes from ``AIRFLOW_CONN_SPARK_DEFAULT=connection_uri``;
    its lake root from ``AFFLUENT_LAKE_ROOT=lake_root``. Returns the function's
    result plus the master URL and application id the driver really used.
    """
    from tests.deployment.app import RESULT_PREFIX

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
        "SPARK_CONF_DIR": str(loopback_spark_conf(work_dir / "spark-conf", s3_endpoint)),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
    })
    env.update(extra_env or {})
    try:
        out = subprocess.run([sys.executable, "-m", "tests.deployment.app", target], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=APP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        partial = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        errors = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        (work_dir / "app.log").write_text(partial + "\n--- stderr ---\n" + errors)
        raise AssertionError(f"Spark application {target} did not finish in {APP_TIMEOUT_SECONDS} s; "
                             f"log in {work_dir / 'app.log'}:\n{errors[-3000:]}") from None
    (work_dir / "app.log").write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    results = [line for line in out.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if out.returncode != 0 or not results:
        raise AssertionError(f"Spark application {target} failed (exit {out.returncode}); "
                             f"log in {work_dir / 'app.log'}:\n{out.stderr[-4000:]}")
    return json.loads(results[-1].removeprefix(RESULT_PREFIX))


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory):
    from tests.deployment.cluster import start_standalone_cluster

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
