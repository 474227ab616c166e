"""Commands and DAGs as clients of the Spark service: key hand-over, refusal of another key, retries.

The suite's one service (``tests/conftest.py``), started as a command starts it
(the key given to the service only). The DAG test runs the real ingest DAG with Airflow's own
``dag.test`` loop in a subprocess (its own Airflow home on SQLite), a thin
client of that service: it has no key and no Spark of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import OTHER_TEST_KEY, TEST_KEY
from tests.privacy_helpers import BATCH, EST, write_planted_batch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
KEY_SOURCE = {"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}
DAG_RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module", autouse=True)
def _classic_after_this_module(service):
    """This process's client sessions of the service end with the module: the rest of the suite runs classic."""
    yield
    from jobs.core import spark_service
    from jobs.core.session import close_clients

    if spark_service.read_state(service.state_dir) is not None:
        close_clients()
    os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)


def _client_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any Airflow, Spark service or key setting, plus ``extra``."""
    from jobs.core.spark_service import KEY_ENVIRONMENT

    dropped = KEY_ENVIRONMENT + ("AFFLUENT_SPARK_REMOTE", "AFFLUENT_SPARK_TOKEN", "SPARK_CONNECT_MODE_ENABLED",
                                 "AFFLUENT_LAKE_ROOT", "AFFLUENT_LANDING_ROOT")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("AIRFLOW")}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


def test_the_airflow_environment_names_the_service_and_holds_no_key(tmp_path, monkeypatch):
    from jobs.app.spark_client import AIRFLOW_CONN_ENV, airflow_client_env
    from jobs.core.session import ENV_REMOTE, remote_url
    from jobs.core.spark_service import ServiceState, ensure_token

    state = ServiceState(pid=os.getpid(), port=15999, started_at=time.time(), state_dir=tmp_path)
    ensure_token(tmp_path)
    given = {"AFFLUENT_PSEUDONYM_KEY": TEST_KEY, "AFFLUENT_PSEUDONYM_KEY_FILE": "/run/secrets/key",
             ENV_REMOTE: "sc://elsewhere:1", "AIRFLOW_HOME": "/srv/airflow"}
    env = airflow_client_env(given, state)
    assert not {"AFFLUENT_PSEUDONYM_KEY", "AFFLUENT_PSEUDONYM_KEY_FILE", ENV_REMOTE} & set(env)
    assert env["AIRFLOW_HOME"] == "/srv/airflow" and TEST_KEY not in json.dumps(env)
    monkeypatch.delenv(ENV_REMOTE, raising=False)
    monkeypatch.setenv(AIRFLOW_CONN_ENV, env[AIRFLOW_CONN_ENV])
    assert remote_url() == state.remote  # what a task reads: the service's address and token


def test_a_service_holding_another_key_is_refused_and_one_holding_the_same_is_reused(service, tmp_path):
    from jobs.core import spark_service

    running = spark_service.read_state(service.state_dir)
    refused = subprocess.run(
        [sys.executable, "-m", "jobs.app.cli", "run", "--establishment", EST], cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=False,
        env=_client_env(AFFLUENT_SPARK_MODE="service", AFFLUENT_SPARK_STATE=str(service.state_dir),
                        AFFLUENT_PSEUDONYM_KEY=OTHER_TEST_KEY, AFFLUENT_LAKE_ROOT=str(tmp_path / "lake"),
                        AFFLUENT_LANDING_ROOT=str(tmp_path / "landing")))
    assert refused.returncode == 4, refused.stderr[-2000:]
    line = refused.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"the Spark service at {service.address} holds the key with fingerprint" in line
    assert "affluent spark stop" in line
    assert spark_service.read_state(service.state_dir).pid == running.pid  # refused, not replaced

    state, started = spark_service.ensure(KEY_SOURCE, service.state_dir)
    assert (state.pid, started) == (running.pid, False)
    assert spark_service.held_fingerprint(state) == spark_service.held_fingerprint(service)


DAG_TEST = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
run = bag.dags[sys.argv[2]].test(run_conf={"batch_id": sys.argv[3]})
tries = {ti.task_id: [str(ti.state), ti.try_number] for ti in run.get_task_instances()}
print("RESULT=" + json.dumps({"state": str(run.state), "tries": tries}), flush=True)
"""


def test_a_task_fails_naming_the_service_while_it_is_down_and_a_retry_succeeds_once_it_is_back(service, tmp_path):
    """The real ingest DAG, Airflow's retry loop (``dag.test``): ingest fails on the stopped service, then lands."""
    from jobs.app.demo import prepare_airflow
    from jobs.app.spark_client import AIRFLOW_CONN_ENV, airflow_connection
    from jobs.core import spark_service
    from jobs.core.session import close_clients

    write_planted_batch(tmp_path / "landing")
    env = _client_env(
        AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False", AFFLUENT_LAKE_ROOT=str(tmp_path / "lake"),
        AFFLUENT_LANDING_ROOT=str(tmp_path / "landing"), AFFLUENT_SPARK_MODE="service",
        **{AIRFLOW_CONN_ENV: airflow_connection(service)},
        # Retries soon and often: the test restarts the service after the first failure, which takes its time.
        AFFLUENT_TASK_RETRIES="40", AFFLUENT_TASK_RETRY_DELAY_SECONDS="5")
    prepare_airflow(env)
    close_clients()  # this process's session of the service ends with it
    spark_service.stop(service.state_dir)
    output = tmp_path / "dag-test.out"
    down = f"the Spark service at {service.address} is not reachable"
    with output.open("w") as out:
        process = subprocess.Popen([sys.executable, "-c", DAG_TEST, str(ROOT / "dags"), f"affluent_ingest_{EST}", BATCH],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DAG_RUN_TIMEOUT_S
        while down not in output.read_text(errors="replace") and process.poll() is None:
            assert time.monotonic() < deadline, "the task never reported the service down"
            time.sleep(1)
        back = spark_service.start(service.state_dir, port=service.port, key_source=KEY_SOURCE)  # the operator
        assert back.token == service.token
        process.wait(DAG_RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    text = output.read_text(errors="replace")
    results = [line for line in text.splitlines() if line.startswith("RESULT=")]
    assert results, text[-4000:]
    result = json.loads(results[-1].removeprefix("RESULT="))
    assert result["state"].endswith("success"), text[-4000:]
    assert all(state.endswith("success") for state, _ in result["tries"].values()), result
    assert result["tries"]["ingest"][1] >= 2  # failed while the service was down, then a retry succeeded
    assert result["tries"]["select_batch"][1] == 1  # reads the batch log with delta-rs: no Spark, no failure
    assert down in text and "affluent spark start" in text
