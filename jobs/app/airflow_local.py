"""The embedded Airflow (``make airflow``): start it on the user's lake, stop every process it started.

``airflow standalone`` runs the API server, scheduler, DAG processor and
triggerer as children, and the LocalExecutor forks workers and log servers
below them. A TERM to the top process alone leaves some of them running, so
``run_standalone`` starts it as the leader of its own session, records the
session in ``$AIRFLOW_HOME/standalone.pid``, and on Ctrl-C or TERM signals
every process of the tree (collected before signalling, so that re-parented
orphans are not missed), waits, then kills what is left. ``stop_standalone``
does the same from another terminal (``make airflow-stop``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

PID_FILE = "standalone.pid"
GRACE_SECONDS = 20


def _tree(root_pid: int) -> list:
    """The process and every descendant, plus anything left in its session (orphans of the tree)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(root_pid)
        found[root.pid] = root
        found.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == root_pid:
                found[process.pid] = process
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def terminate_tree(root_pid: int, grace: float = GRACE_SECONDS) -> int:
    """TERM every process of the tree, KILL the ones still alive after ``grace`` s; return how many were signalled."""
    import psutil

    processes = _tree(root_pid)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)
    return len(processes)


def run_standalone(env: dict[str, str]) -> int:
    """Run ``airflow standalone`` until it exits or this process gets Ctrl-C / TERM; then leave nothing behind."""
    pid_file = Path(env["AIRFLOW_HOME"]) / PID_FILE
    process = subprocess.Popen(["airflow", "standalone"], env=env, start_new_session=True)
    pid_file.write_text(f"{process.pid}\n", encoding="utf-8")
    stopping = {"signal": None}

    def stop(signum, _frame):
        stopping["signal"] = signum
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    except KeyboardInterrupt:
        print("\nStopping Airflow and every process it started …", flush=True)
        count = terminate_tree(process.pid)
        print(f"Airflow stopped ({count} processes ended).", flush=True)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if process.poll() is None:
            terminate_tree(process.pid)
        pid_file.unlink(missing_ok=True)


def stop_standalone(airflow_home: Path) -> int:
    """Stop the embedded Airflow started by ``run_standalone`` under ``airflow_home`` (from another terminal)."""
    pid_file = airflow_home / PID_FILE
    if not pid_file.is_file():
        print(f"No embedded Airflow recorded in {pid_file}: nothing to stop.")
        return 0
    pid = int(pid_file.read_text(encoding="utf-8").strip())
    count = terminate_tree(pid)
    pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _tree(pid):
        time.sleep(0.2)
    print(f"Airflow stopped ({count} processes ended).")
    return 0
