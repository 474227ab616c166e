"""Airflow as a data engineer runs it: ``make airflow`` on loopback, the REST API, the task logs, a clean stop.

Starts ``affluent airflow`` (what ``make airflow`` runs: ``airflow standalone``
on SQLite) on an exported lake, triggers one establishment's ingest run through
the REST API, waits for it and for the publish run its Asset events trigger,
then reads every task log through the API. Every task is a client of the
Spark service ``affluent airflow`` starts (its own state folder here): no task
process starts a JVM. Stops it with TERM, as Ctrl-C would, and checks that no
process of the tree is left and that ``--stop-spark`` stopped the service too. Run with
``make test-airflow`` (it is left out of ``make test`` for time).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIG_DIR, TEST_KEY

pytestmark = [pytest.mark.integration, pytest.mark.airflow_standalone]

ROOT = Path(__file__).resolve().parents[2]
ESTABLISHMENT = "chu_laurentides"
INGEST_DAG = f"affluent_ingest_{ESTABLISHMENT}"
START_TIMEOUT, RUN_TIMEOUT = 420, 1500


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_of(home: Path) -> list:
    """Every process whose environment names this test's AIRFLOW_HOME (the whole tree, orphans included)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("AIRFLOW_HOME") == str(home):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


class Api:
    def __init__(self, base: str, token: str):
        import httpx

        self.client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def get(self, path: str, **params) -> dict:
        response = self.client.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def wait_for(self, what: str, check, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    import httpx

    from jobs.core.config import load_consortium
    from jobs.generate import generate_consortium

    workdir = tmp_path_factory.mktemp("airflow")
    generate_consortium(workdir / "consortium", load_consortium(CONFIG_DIR), patients=30, batches=1, seed=3,
                        defect_rate=0.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AFFLUENT_"))}
    env.update({
        # An exported lake: `make airflow` must use it, not a demo lake.
        "AFFLUENT_LAKE_ROOT": str(workdir / "exported-lake"),
        "AFFLUENT_LANDING_ROOT": str(workdir / "consortium" / "landing"),
        "AFFLUENT_CONFIG_DIR": str(CONFIG_DIR),
        "AFFLUENT_PSEUDONYM_KEY": TEST_KEY,
        "AFFLUENT_SHUFFLE_PARTITIONS": "2",
        "AFFLUENT_DRIVER_MEMORY": "1g",
        "AFFLUENT_TODAY": os.environ["AFFLUENT_TODAY"],
        "AFFLUENT_SPARK_STATE": str(workdir / "spark-service"),  # its own service, never this machine's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    port = _free_port()
    log = (workdir / "standalone.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "jobs.app.cli", "airflow", "--workdir", str(workdir / "af"),
                                "--port", str(port), "--stop-spark"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    home = workdir / "af" / "airflow"
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        passwords = home / "simple_auth_manager_passwords.json.generated"
        while True:
            assert process.poll() is None, (workdir / "standalone.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/api/v2/version", timeout=5).status_code == 200 and passwords.is_file():
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Airflow did not start:\n" + (workdir / "standalone.log").read_text()[-3000:]
            time.sleep(3)
        user, password = next(iter(json.loads(passwords.read_text()).items()))
        token = httpx.post(f"{base}/auth/token", json={"username": user, "password": password},
                           timeout=30).json()["access_token"]
        yield Api(base, token), process, home, workdir
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


@pytest.fixture(scope="module")
def ingest_run(airflow):
    """The triggered run and the run that landed the batch.

    Unpausing an hourly DAG with ``catchup=False`` also starts a scheduled run at
    once; with one active run per establishment, whichever starts first takes the
    pending batch and the other finds nothing pending and says so.
    """
    api, _, _, _ = airflow
    api.wait_for("the DAGs to be parsed", lambda: {d["dag_id"] for d in api.get("/api/v2/dags")["dags"]}
                 >= {INGEST_DAG, "affluent_publish", "affluent_maintenance"}, START_TIMEOUT)
    response = api.client.post(f"/api/v2/dags/{INGEST_DAG}/dagRuns", json={"logical_date": None, "conf": {}})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    api.client.patch(f"/api/v2/dags/{INGEST_DAG}", json={"is_paused": False}).raise_for_status()

    _, _, home, _ = airflow
    jvms: set[int] = set()

    def all_finished():
        # A task that started its own Spark would hold a JVM for all its run: seen within 5 s.
        jvms.update(p.pid for p in _processes_of(home) if "org.apache.spark.deploy.SparkSubmit" in _cmdline(p))
        runs = api.get(f"/api/v2/dags/{INGEST_DAG}/dagRuns")["dag_runs"]
        mine = [r for r in runs if r["dag_run_id"] == run_id]
        if mine and all(r["state"] in ("success", "failed") for r in runs):
            return runs
        return None

    runs = api.wait_for(f"ingest run {run_id} and any scheduled run", all_finished, RUN_TIMEOUT)
    triggered = next(r for r in runs if r["dag_run_id"] == run_id)
    landing = [r for r in runs if _task_state(api, r["dag_run_id"], "land") == "success"]
    assert len(landing) == 1, runs
    return {"triggered": triggered, "landing": landing[0], "runs": runs, "jvms": jvms}


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _task_state(api: Api, run_id: str, task_id: str) -> str | None:
    tis = api.get(f"/api/v2/dags/{INGEST_DAG}/dagRuns/{run_id}/taskInstances")["task_instances"]
    return next((ti["state"] for ti in tis if ti["task_id"] == task_id), None)


def _logs(api: Api, dag_id: str, run_id: str) -> dict[str, list[dict]]:
    logs = {}
    for ti in api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]:
        if ti["try_number"] < 1:
            continue
        response = api.client.get(
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/logs/{ti['try_number']}",
            params={"full_content": "true"}, headers={"Accept": "application/json"})
        response.raise_for_status()
        content = response.json()["content"]
        logs[ti["task_id"]] = [entry if isinstance(entry, dict) else {"event": str(entry)} for entry in content]
    return logs


def test_publish_and_maintenance_are_unpaused_from_the_start(airflow):
    api, _, _, _ = airflow
    dags = api.wait_for("the DAGs to be parsed", lambda: {d["dag_id"]: d for d in api.get("/api/v2/dags")["dags"]
                                                          if d["dag_id"] in ("affluent_publish",
                                                                             "affluent_maintenance")}
                        if len(api.get("/api/v2/dags")["dags"]) >= 5 else None, START_TIMEOUT)
    assert {dag_id: d["is_paused"] for dag_id, d in dags.items()} == {
        "affluent_publish": False, "affluent_maintenance": False}


def test_the_triggered_run_lands_on_the_exported_lake(airflow, ingest_run):
    _, _, _, workdir = airflow
    assert all(r["state"] == "success" for r in ingest_run["runs"]), ingest_run["runs"]
    assert (workdir / "exported-lake" / "silver" / "patient" / "_delta_log").is_dir()
    assert not (workdir / "af" / "lake").exists()


def test_task_logs_hold_no_error_and_one_figures_line_per_dataset(airflow, ingest_run):
    api, _, _, _ = airflow
    for run in ingest_run["runs"]:
        run_logs = _logs(api, INGEST_DAG, run["dag_run_id"])
        errors = {task: [e.get("event") for e in entries if str(e.get("level", "")).lower() in ("error", "critical")]
                  for task, entries in run_logs.items()}
        assert not any(errors.values()), (run["dag_run_id"], errors)
    logs = _logs(api, INGEST_DAG, ingest_run["landing"]["dag_run_id"])
    assert {"ingest", "pseudonymise", "validate", "land"} <= set(logs)
    land_lines = [e["event"] for e in logs["land"] if str(e.get("event", "")).startswith(f"land {ESTABLISHMENT}/")]
    datasets = {line.split(":", 1)[0].rsplit(" ", 1)[1] for line in land_lines}
    assert {"patient", "encounter", "diagnosis", "lab_result"} <= datasets, land_lines
    assert len(land_lines) == len(datasets)
    assert any("validation report" in str(e.get("event")) for e in logs["validate"])


def test_a_manual_run_that_waited_for_the_scheduled_one_says_so(airflow, ingest_run):
    import datetime as dt

    api, _, _, _ = airflow
    triggered = ingest_run["triggered"]
    waited = (dt.datetime.fromisoformat(triggered["start_date"]) - dt.datetime.fromisoformat(triggered["run_after"]))
    lines = [str(e.get("event")) for e in _logs(api, INGEST_DAG, triggered["dag_run_id"]).get("select_batch", [])]
    said = any("this manual run was requested" in line for line in lines)
    assert said == (waited >= dt.timedelta(seconds=30)), (waited, lines[-10:])


def test_the_assets_trigger_a_publish_run(airflow, ingest_run):
    api, _, _, _ = airflow

    def published():
        runs = api.get("/api/v2/dags/affluent_publish/dagRuns")["dag_runs"]
        done = [r for r in runs if r["run_type"] == "asset_triggered" and r["state"] in ("success", "failed")]
        return done[0] if done else None

    run = api.wait_for("the asset-triggered publish run", published, RUN_TIMEOUT)
    assert run["state"] == "success", run
    logs = _logs(api, "affluent_publish", run["dag_run_id"])
    errors = [e.get("event") for entries in logs.values() for e in entries
              if str(e.get("level", "")).lower() in ("error", "critical")]
    assert not errors, errors


def test_no_task_starts_a_jvm_every_one_is_a_client_of_the_service(airflow, ingest_run):
    from jobs.app.spark_client import spark_jvms
    from jobs.core.spark_service import read_state

    _, _, home, workdir = airflow
    assert ingest_run["jvms"] == set()
    service = read_state(workdir / "spark-service")
    assert service is not None and len(spark_jvms(service.pid)) == 1
    assert "Spark: started the service at sc://localhost:" in (workdir / "standalone.log").read_text()


def test_stopping_leaves_no_process_behind(airflow, ingest_run):
    _, process, home, _ = airflow
    assert _processes_of(home), "the running Airflow should be found by its AIRFLOW_HOME"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    deadline = time.monotonic() + 30
    while _processes_of(home) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _processes_of(home), [p.cmdline() for p in _processes_of(home)]
    from jobs.core.spark_service import read_state

    assert read_state(airflow[3] / "spark-service") is None  # --stop-spark: the service stopped with Airflow
