"""Batches through their ingest DAG run by Airflow's scheduler, start to end, each task a client of the Spark service.

Usage::

    .venv/bin/python -m benchmarks.scheduler                          # ~800-row incremental batch
    .venv/bin/python -m benchmarks.scheduler --patients 400 --json out.json

Generates a consortium (``--patients``, two batches: a full one, then an
incremental one), starts ``affluent airflow`` on it (``airflow standalone``:
SQLite, the scheduler, the API server; the Spark service started with it),
and for the establishment whose incremental batch is the largest, triggers
its ingest DAG once per batch through the REST API, one run after the other.
Each figure is the run's own start to end as Airflow records it (the four
stage tasks, scheduled, run and recorded), and the time from the trigger to
the end, with each task's own start to end (the rest is the scheduler's); the Delta commits the run made are read from the lake's logs. The
publish and maintenance DAGs are paused for the measure (publish would start
on the same assets mid-run). Figures only, nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.probe import code_version, delta_commits, delta_versions  # noqa: E402
from jobs.core.settings import PROJECT_ROOT  # noqa: E402

SEED = 20261207
START_TIMEOUT, RUN_TIMEOUT = 600, 3600
PAUSED_FOR_THE_MEASURE = ("affluent_publish", "affluent_maintenance")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _batches(landing: Path) -> dict[str, list[tuple[str, int]]]:
    found: dict[str, list[tuple[str, int]]] = {}
    for manifest in sorted(landing.glob("*/*/manifest.json")):
        data = json.loads(manifest.read_text())
        rows = sum(int(f.get("rows", 0) or 0) for f in data.get("files", []))
        found.setdefault(manifest.parent.parent.name, []).append((manifest.parent.name, rows))
    return found


class Api:
    def __init__(self, base: str, token: str):
        import httpx

        self.client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def get(self, path: str) -> dict:
        response = self.client.get(path)
        response.raise_for_status()
        return response.json()

    def send(self, method: str, path: str, body: dict, attempts: int = 5):
        """A write request, tried again on a server error: SQLite's lock, held by the scheduler while a task
        starts, makes the API server give up after its 5 s busy timeout (a 500) now and then."""
        for attempt in range(attempts):
            response = self.client.request(method, path, json=body)
            if response.status_code < 500 or attempt == attempts - 1:
                response.raise_for_status()
                return response
            time.sleep(2)
        raise AssertionError("unreachable")

    def wait_for(self, what: str, check, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(1)
        raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def _start_airflow(work: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Api]:
    import httpx

    port = _free_port()
    log = (work / "standalone.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "jobs.app.cli", "airflow", "--workdir", str(work / "af"),
                                "--port", str(port), "--stop-spark"],
                               cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    passwords = work / "af" / "airflow" / "simple_auth_manager_passwords.json.generated"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise SystemExit("Airflow ended at start:\n" + (work / "standalone.log").read_text()[-3000:])
        try:
            if httpx.get(f"{base}/api/v2/version", timeout=5).status_code == 200 and passwords.is_file():
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("Airflow did not start:\n" + (work / "standalone.log").read_text()[-3000:])
        time.sleep(2)
    user, password = next(iter(json.loads(passwords.read_text()).items()))
    token = httpx.post(f"{base}/auth/token", json={"username": user, "password": password},
                       timeout=30).json()["access_token"]
    return process, Api(base, token)


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 1)


def _task_seconds(api: Api, dag_id: str, run_id: str) -> list[dict]:
    """Each task of the run, in the order it started, with its own start to end as Airflow records it: what the
    run spends outside them is the scheduler's (queueing a task, starting its process, noticing its end)."""
    instances = api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
    instances.sort(key=lambda t: t.get("start_date") or "")
    return [{"task": t["task_id"], "state": t["state"], "seconds": _seconds(t.get("start_date"), t.get("end_date"))}
            for t in instances]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="affluent-bench-scheduler-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AFFLUENT_SPARK_"))}
    if not (env.get("AFFLUENT_PSEUDONYM_KEY") or env.get("AFFLUENT_PSEUDONYM_KEY_FILE")):
        env["AFFLUENT_PSEUDONYM_KEY"] = secrets.token_hex(32)  # throwaway key for synthetic data
    lake = work / "lake"
    env.update({
        "AFFLUENT_LAKE_ROOT": str(lake),
        "AFFLUENT_LANDING_ROOT": str(work / "consortium" / "landing"),
        "AFFLUENT_SPARK_STATE": str(work / "spark-service"),  # its own service, stopped with Airflow
        "AFFLUENT_SPARK_PORT": str(_free_port()),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    subprocess.run([sys.executable, "-m", "jobs.app.cli", "generate", "--out", str(work / "consortium"),
                    "--patients", str(args.patients), "--batches", "2", "--seed", str(SEED), "--defect-rate", "0.02"],
                   env=env, cwd=PROJECT_ROOT, check=True, capture_output=True)
    batches = _batches(work / "consortium" / "landing")
    establishment = max(batches, key=lambda e: batches[e][-1][1])
    dag_id = f"affluent_ingest_{establishment}"
    print(f"[scheduler] {establishment}: {', '.join(f'{b} ({n} rows)' for b, n in batches[establishment])}",
          flush=True)

    started = time.monotonic()
    process, api = _start_airflow(work, env)
    print(f"[scheduler] Airflow and the Spark service up in {time.monotonic() - started:.0f} s", flush=True)
    runs: list[dict] = []
    try:
        api.wait_for("the DAGs to be parsed", lambda: dag_id in {d["dag_id"] for d in api.get("/api/v2/dags")["dags"]},
                     START_TIMEOUT)
        for other in PAUSED_FOR_THE_MEASURE:
            api.send("PATCH", f"/api/v2/dags/{other}", {"is_paused": True})
        api.send("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        unpaused_at = time.monotonic()
        # Unpausing starts a scheduled run at once (catchup off): it takes the first batch.
        seen: set[str] = set()
        for batch, rows in batches[establishment]:
            before = delta_versions(lake) if lake.exists() else {}
            triggered_at = time.monotonic()
            scheduled = None
            if not runs:  # the run the unpause starts, if the scheduler makes it within a minute
                deadline = time.monotonic() + 60
                while scheduled is None and time.monotonic() < deadline:
                    scheduled = next(iter(api.get(f"/api/v2/dags/{dag_id}/dagRuns")["dag_runs"]), None)
                    time.sleep(1)
                if scheduled is not None:
                    triggered_at = unpaused_at
            if scheduled is None:
                api.send("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": {}})

            def finished():
                found = [r for r in api.get(f"/api/v2/dags/{dag_id}/dagRuns")["dag_runs"] if r["dag_run_id"] not in seen]
                done = [r for r in found if r["state"] in ("success", "failed")]
                return done[0] if done and len(done) == len(found) else None

            run = api.wait_for(f"the run of batch {batch}", finished, RUN_TIMEOUT)
            wall = time.monotonic() - triggered_at
            seen.add(run["dag_run_id"])
            commits = sum(delta_commits(before, delta_versions(lake)).values())
            tasks = _task_seconds(api, dag_id, run["dag_run_id"])
            figure = {"batch": batch, "rows": rows, "state": run["state"],
                      "run_seconds": _seconds(run.get("start_date"), run.get("end_date")),
                      "trigger_to_end_seconds": round(wall, 1), "delta_commits": commits, "tasks": tasks,
                      "in_tasks_seconds": round(sum(t["seconds"] or 0 for t in tasks), 1)}
            runs.append(figure)
            print(f"[scheduler] batch {batch} ({rows} rows): run {figure['run_seconds']} s "
                  f"(trigger to end {figure['trigger_to_end_seconds']} s; in its tasks "
                  f"{figure['in_tasks_seconds']} s: " + ", ".join(f"{t['task']} {t['seconds']}" for t in tasks)
                  + f"), {commits} Delta commits, {run['state']}", flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            process.kill()
    record = {"establishment": establishment, "patients": args.patients, "runs": runs,
              "code": code_version(PROJECT_ROOT), "cores": os.cpu_count(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r["state"] == "success" for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
