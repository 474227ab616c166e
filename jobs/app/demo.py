"""The end-to-end demo: a synthetic consortium through every DAG, with real Airflow.

Generates the consortium, then runs each establishment's ingest DAG once per
pending batch and the publish DAG with ``dag.test()`` — Airflow's in-process
runner, the same as ``airflow dags test`` — on SQLite, with local Spark and the
lake on the local disk. Ends with a summary, a researcher query, and how to
open the Airflow UI and the validation reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from jobs.app.airflow_preload import SETTINGS_DIR
from jobs.core.settings import PROJECT_ROOT



_TERMINAL = None


def _say(message: str) -> None:
    line = f"[affluent demo] {message}\n"
    if _TERMINAL is not None:
        _TERMINAL.write(line)
        _TERMINAL.flush()
    else:
        print(line, end="", flush=True)


@contextlib.contextmanager
def logs_to(path: Path):
    """Send everything written to stdout and stderr (Airflow, GX, the JVM) to ``path``; progress stays on screen."""
    global _TERMINAL
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _TERMINAL = os.fdopen(os.dup(1), "w", buffering=1)
    with path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            _TERMINAL.close()
            _TERMINAL = None


# What the embedded Airflow needs to find the lake; each has a default under the work folder.
LAKE_VARIABLES = ("AFFLUENT_LAKE_ROOT", "AFFLUENT_LANDING_ROOT", "AFFLUENT_CONFIG_DIR")


def airflow_env(workdir: Path, keep_exported: bool = False) -> dict[str, str]:
    """Environment for Airflow and the jobs: SQLite metadata, local Spark, a lake.

    The demo (``keep_exported=False``) always uses its own synthetic lake under
    ``workdir``, so it can never write into a real one. ``affluent airflow``
    (``keep_exported=True``) keeps an exported lake, landing root, config
    folder and key, and fills in defaults only for what is unset.
    """
    workdir = workdir.resolve()
    home = workdir / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "60",
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # Airflow's local settings: its scheduler preloads what every task imports (jobs.app.airflow_preload).
        "PYTHONPATH": os.pathsep.join(p for p in (str(SETTINGS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    })
    defaults = {
        "AFFLUENT_LAKE_ROOT": str(workdir / "lake"),
        "AFFLUENT_LANDING_ROOT": str(workdir / "consortium" / "landing"),
        "AFFLUENT_CONFIG_DIR": str(PROJECT_ROOT / "config"),
    }
    for name, value in defaults.items():
        exported = os.environ.get(name)
        if exported and (keep_exported or name == "AFFLUENT_CONFIG_DIR"):
            continue  # the demo keeps an exported configuration folder too: it is read, never written
        env[name] = value
    has_key = env.get("AFFLUENT_PSEUDONYM_KEY") or env.get("AFFLUENT_PSEUDONYM_KEY_FILE")
    # A throwaway key only for the demo's own synthetic lake: a real lake without its key fails closed.
    if not has_key and env["AFFLUENT_LAKE_ROOT"] == defaults["AFFLUENT_LAKE_ROOT"]:
        env["AFFLUENT_PSEUDONYM_KEY_FILE"] = str(_demo_key(workdir))
    return env


def describe_lake(env: dict[str, str]) -> list[str]:
    """One line per setting the DAGs will use, saying whether it came from the environment (never the key)."""
    lines = [f"{name}={env[name]}  ({'exported' if os.environ.get(name) == env[name] else 'default'})"
             for name in LAKE_VARIABLES]
    if os.environ.get("AFFLUENT_PSEUDONYM_KEY"):
        lines.append("pseudonymisation key: AFFLUENT_PSEUDONYM_KEY (exported)")
    elif os.environ.get("AFFLUENT_PSEUDONYM_KEY_FILE"):
        lines.append(f"pseudonymisation key: file {env['AFFLUENT_PSEUDONYM_KEY_FILE']} (exported)")
    elif env.get("AFFLUENT_PSEUDONYM_KEY_FILE"):
        lines.append(f"pseudonymisation key: demo key file {env['AFFLUENT_PSEUDONYM_KEY_FILE']} (synthetic data only)")
    else:
        lines.append("pseudonymisation key: NONE — export AFFLUENT_PSEUDONYM_KEY or AFFLUENT_PSEUDONYM_KEY_FILE, "
                     "or set the Airflow connection affluent_pseudonym_key; tasks refuse to run without it")
    return lines


def _demo_key(workdir: Path) -> Path:
    """A throwaway key for the demo's synthetic data, created once, readable by its owner only."""
    path = workdir / "secrets" / "pseudonym.key"
    if not path.exists():
        from jobs.privacy.keys import generate_key_file

        generate_key_file(path)  # what `affluent key generate` writes: random bytes, owner-only
        _say(f"created a demo pseudonymisation key in {path} (synthetic data only; a real deployment "
             "provides its own through AFFLUENT_PSEUDONYM_KEY, a key file or an Airflow connection)")
    return path


def run_dags(env: dict[str, str], establishments: list[str], publish: bool = True,
             census=None) -> dict[str, list[tuple[str, str]]]:
    """Run each establishment's ingest DAG for every pending batch, then publish; return run states.

    ``census`` (a callable returning one line) is printed after each DAG run:
    a JVM a task started in this process would still be alive then.
    """
    os.environ.update(env)
    from airflow.dag_processing.dagbag import DagBag

    from jobs.stages import pipeline

    bag = DagBag(dag_folder=env["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    ctx = pipeline.Context.from_env()
    states: dict[str, list[tuple[str, str]]] = {}
    for est in establishments:
        dag = bag.dags[f"affluent_ingest_{est}"]
        for batch in pipeline.pending(ctx, est):
            started = time.monotonic()
            _say(f"{dag.dag_id}: batch {batch} …")
            run = dag.test(run_conf={"batch_id": batch})
            state = str(run.state)
            _say(f"{dag.dag_id}: batch {batch} {state} in {time.monotonic() - started:.0f} s"
                 f"{_landed_figures(ctx, est, batch)}")
            if census is not None:
                _say(census())
            states.setdefault(est, []).append((batch, state))
    if publish:
        started = time.monotonic()
        run = bag.dags["affluent_publish"].test()
        _say(f"affluent_publish {run.state} in {time.monotonic() - started:.0f} s")
        if census is not None:
            _say(census())
        states["publish"] = [("-", str(run.state))]
    return states


def _landed_figures(ctx, establishment_id: str, batch_id: str) -> str:
    from pyspark.sql import functions as F

    from jobs.core.batchlog import Stage, Status
    from jobs.core.ops import read_batch_log

    totals = (read_batch_log(ctx.spark, ctx.lake)
              .where((F.col("establishment_id") == establishment_id) & (F.col("batch_id") == batch_id)
                     & (F.col("stage") == Stage.LAND.value) & (F.col("status") == Status.LANDED.value))
              .agg(F.sum("rows_read").alias("read"), F.sum("rows_landed").alias("rows_landed"),
                   F.sum("rows_quarantined").alias("quarantined"), F.sum("rows_duplicates").alias("duplicates"))
              .first())
    if totals is None or totals.read is None:
        return ""
    return (f": {totals.read} rows read, {totals.rows_landed} landed, {totals.quarantined} quarantined, "
            f"{totals.duplicates} duplicates")


def _migrate(env: dict[str, str]) -> None:
    _say("initialising Airflow's metadata database (SQLite) …")
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    ensure_writers_pool(env)


def ensure_writers_pool(env: dict[str, str]) -> None:
    """The one-slot pool every lake-writing task runs in (land, publish, maintenance), created or reset.

    Without it the scheduler never starts those tasks; with one slot, VACUUM,
    erasure and a MERGE never overlap. Compose creates it in ``airflow-init``.
    """
    from jobs.core.registry import LAKE_WRITERS_POOL, LAKE_WRITERS_POOL_DESCRIPTION, LAKE_WRITERS_POOL_SLOTS

    subprocess.run(["airflow", "pools", "set", LAKE_WRITERS_POOL, str(LAKE_WRITERS_POOL_SLOTS),
                    LAKE_WRITERS_POOL_DESCRIPTION], env=env, check=True, stdout=subprocess.DEVNULL)


def prepare_airflow(env: dict[str, str]) -> None:
    """Airflow's metadata database migrated, with the lake writers' pool: what ``affluent airflow`` needs first."""
    _migrate(env)


def print_summary(ctx) -> None:
    from pyspark.sql import functions as F

    from jobs.core.batchlog import Stage
    from jobs.core.ops import read_batch_log

    log = read_batch_log(ctx.spark, ctx.lake).where(F.col("stage") == Stage.LAND.value)
    print("\nBatches landed (rows read = landed + quarantined + duplicates):")
    log.orderBy("establishment_id", "batch_id", "dataset").select(
        "establishment_id", "batch_id", "dataset", "rows_read", "rows_landed", "rows_quarantined",
        "rows_duplicates").show(200, truncate=False)
    quarantine = ctx.spark.read.format("delta").load(ctx.lake.quarantine())
    print("Quarantined rows by rule:")
    quarantine.groupBy("establishment_id", "rule").count().orderBy("establishment_id", "rule").show(100, truncate=False)


def use_spark_service(env: dict[str, str], classic: bool) -> tuple[dict[str, str], object | None, bool]:
    """The environment the DAGs run in: a client of the Spark service (started if none runs), holding no key.

    Returns that environment, the service (None when classic) and whether it was started now.
    """
    from jobs.core import spark_service

    if spark_service.spark_mode(classic) == spark_service.MODE_CLASSIC:
        return env, None, False
    from jobs.app.spark_client import airflow_client_env, attach

    state, started = attach(env)  # the key (exported, or the demo's key file) goes to the service only
    for name in spark_service.KEY_ENVIRONMENT:  # the tasks run in this process: it must not hold the key
        os.environ.pop(name, None)
    _say(f"Spark: {'started' if started else 'reusing'} the service at {state.address} (pid {state.pid}); every "
         "task is its client through the Airflow connection affluent_spark")
    return airflow_client_env(env, state), state, started


def jvm_census(service_pid: int | None) -> str:
    """Which Spark JVMs run for this demo: the service's, and any in this process or the tasks it runs."""
    from jobs.app.spark_client import spark_jvms

    service = spark_jvms(service_pid) if service_pid else []
    # A service this process started is its child (detached, in its own session): not one of its JVMs.
    here = [pid for pid in spark_jvms(os.getpid()) if pid not in service]
    return (f"Spark JVMs: {len(service) + len(here)} — the service's: {len(service)} "
            f"(pids {', '.join(map(str, service)) or 'none'}); in this process and its tasks: {len(here)}")


def run_demo(patients: int, batches: int, seed: int, defect_rate: float, workdir: Path, classic: bool = False,
             keep_spark: bool = False) -> int:
    started = time.monotonic()
    workdir = workdir.resolve()
    env, service, service_started = use_spark_service(airflow_env(workdir), classic)
    os.environ.update(env)
    try:
        return _run_demo(patients, batches, seed, defect_rate, workdir, env, started,
                         getattr(service, "pid", None))
    finally:
        if service_started and not keep_spark:
            from jobs.core import spark_service
            from jobs.core.session import close_clients

            close_clients()
            spark_service.stop(service.state_dir)  # type: ignore[union-attr]
            _say("stopped the Spark service the demo started (--keep-spark leaves it running)")


def _run_demo(patients: int, batches: int, seed: int, defect_rate: float, workdir: Path, env: dict[str, str],
              started: float, service_pid: int | None) -> int:
    from jobs.stages import pipeline
    from jobs.core.config import load_consortium
    from jobs.generate import generate_consortium

    consortium = load_consortium(Path(env["AFFLUENT_CONFIG_DIR"]))
    out = workdir / "consortium"
    if not (out / "landing").exists():
        _say(f"generating {patients} patients, {batches} batches per establishment in {out} …")
        generate_consortium(out, consortium, patients=patients, batches=batches, seed=seed, defect_rate=defect_rate)
    _migrate(env)
    log = workdir / "airflow" / "logs" / "demo.log"
    _say(f"running the DAGs with Airflow (dag.test); their logs go to {log}")
    with logs_to(log):
        states = run_dags(env, sorted(consortium.establishments), census=lambda: jvm_census(service_pid))
        ctx = pipeline.Context.from_env()
    print_summary(ctx)
    failed = [(est, b, s) for est, runs in states.items() for b, s in runs if not s.endswith("success")]

    # Researchers reach the extracts only through the gateway: its own process, no key, a token per member.
    from jobs.research.gateway.demo import show

    show(ctx.lake.root, str(ctx.settings.config_dir))

    reports = ctx.lake.reports()
    print(f"""
Done in {time.monotonic() - started:.0f} s. Lake: {ctx.lake.root}
- Validation reports (HTML): open {reports}/index.html in a browser.
- Batch log: .venv/bin/affluent batches   (with AFFLUENT_LAKE_ROOT={ctx.lake.root})
- Airflow UI with these DAGs and runs: make airflow   (then http://localhost:8080, login printed at start)
""")
    if failed:
        print(f"Some DAG runs did not succeed: {failed}", file=sys.stderr)
        return 1
    return 0
