"""Screenshots of the Airflow UI for the README: the DAG list, a run's grid and a task log.

Starts ``affluent airflow`` (what ``make airflow`` runs) on a tiny generated
consortium, with the simple auth manager's all-admins mode so that a headless
browser needs no login, unpauses one ingest DAG through the REST API (the
scheduler starts its run at once), waits for that run and for the publish run
its Assets trigger, then has headless Chromium take the pictures and stops
Airflow.

    .venv/bin/python scripts/airflow_screens.py --out docs/screens

Needs ``chromium`` (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DAG = "affluent_ingest_chu_laurentides"
TEST_ONLY_KEY = "0123456789abcdef" * 4  # synthetic data only


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(what: str, check, timeout: float = 1800):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except Exception:  # noqa: BLE001 - the server is still starting
            found = None
        if found:
            return found
        time.sleep(5)
    raise SystemExit(f"timed out waiting for {what}")


def shoot(browser: str, url: str, target: Path, size: str = "1500,950") -> None:
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", "--virtual-time-budget=15000", f"--screenshot={target}", url],
                   check=True, capture_output=True, timeout=180)
    shrink(target)
    print(f"{target} <- {url} ({target.stat().st_size // 1024} kB)", flush=True)


def shrink(png: Path) -> None:
    """Re-save as a 256-colour PNG: the UI's flat colours survive, the file is a third to a sixth of the size."""
    try:
        from PIL import Image  # installed with matplotlib; without it the full-colour PNG is kept
    except ImportError:
        return
    with Image.open(png) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(png, optimize=True)


def main() -> int:
    import httpx

    from jobs.core.config import load_consortium
    from jobs.generate import generate_consortium

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screens")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    work = Path(tempfile.mkdtemp(prefix="affluent-screens-"))
    print(f"work folder (Airflow's output in airflow.log): {work}", flush=True)
    generate_consortium(work / "consortium", load_consortium(ROOT / "config"), patients=40, batches=1, seed=3,
                        defect_rate=0.03)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AFFLUENT_"))}
    env.update({"AFFLUENT_LAKE_ROOT": str(work / "lake"),
                "AFFLUENT_LANDING_ROOT": str(work / "consortium" / "landing"),
                "AFFLUENT_PSEUDONYM_KEY": TEST_ONLY_KEY, "AFFLUENT_SHUFFLE_PARTITIONS": "2",
                "AFFLUENT_DRIVER_MEMORY": "1g",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "jobs.app.cli", "airflow", "--workdir", str(work / "af"),
                                "--port", str(port)], cwd=ROOT, env=env,
                               stdout=(work / "airflow.log").open("w"), stderr=subprocess.STDOUT)
    try:
        _wait("the API", lambda: httpx.get(f"{base}/api/v2/version", timeout=5).status_code == 200, 600)
        token = httpx.get(f"{base}/auth/token", timeout=30).json()["access_token"]
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        _wait("the DAGs", lambda: len(api.get("/api/v2/dags").json()["dags"]) >= 5, 600)
        # Unpausing the DAG is what starts its run: with an hourly schedule and catchup off, the scheduler creates
        # a run at once. A run triggered besides it would find the only batch already taken and skip every task.
        api.patch(f"/api/v2/dags/{DAG}", json={"is_paused": False}).raise_for_status()
        run_id = _wait("the ingest run to start", lambda: next(
            (r["dag_run_id"] for r in api.get(f"/api/v2/dags/{DAG}/dagRuns").json()["dag_runs"]), None), 600)
        state = _wait("the ingest run", lambda: (s := api.get(f"/api/v2/dags/{DAG}/dagRuns/{run_id}").json()["state"])
                      in ("success", "failed") and s)
        land = api.get(f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/land").json()["state"]
        print(f"ingest run {run_id}: {state}, land: {land}", flush=True)
        if state != "success" or land != "success":
            raise SystemExit(f"the ingest run did not land its batch; see {work / 'airflow.log'}")
        _wait("the publish run", lambda: any(r["state"] in ("success", "failed") for r in
                                            api.get("/api/v2/dags/affluent_publish/dagRuns").json()["dag_runs"]))
        args.out.mkdir(parents=True, exist_ok=True)
        shoot(browser, f"{base}/dags", args.out / "dag-list.png")
        shoot(browser, f"{base}/dags/{DAG}/runs/{run_id}", args.out / "run-grid.png")
        shoot(browser, f"{base}/dags/{DAG}/runs/{run_id}/tasks/land", args.out / "task-log.png", "1500,1100")
        (args.out / "README.md").write_text(
            "Screenshots of the embedded Airflow (`make airflow`), taken by `scripts/airflow_screens.py` with "
            "headless Chromium: the DAG list, an ingest run's grid and the land task's log.\n", encoding="utf-8")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    print(json.dumps({"workdir": str(work)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
