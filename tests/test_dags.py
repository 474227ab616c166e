"""DAG integrity: every DAG imports cleanly, without heavy modules, and is wired as intended."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"
HEAVY = ("pyspark", "great_expectations", "pandas", "delta", "deltalake", "duckdb")


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home")
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) >= {
        "affluent_ingest_chu_laurentides", "affluent_ingest_hopital_riviere", "affluent_ingest_cisss_estuaire",
        "affluent_publish", "affluent_maintenance"}


def test_dag_files_import_no_heavy_module_at_parse_time():
    code = textwrap.dedent(f"""
        import runpy, sys, glob
        for path in sorted(glob.glob({str(DAGS)!r} + "/*.py")):
            runpy.run_path(path)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print("HEAVY=" + ",".join(heavy))
    """)
    env = dict(os.environ, AIRFLOW__CORE__LOAD_EXAMPLES="False")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    marker = [line for line in out.stdout.splitlines() if line.startswith("HEAVY=")]
    assert marker == ["HEAVY="]


def test_tags_owners_retries_timeouts_docs(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert "affluent" in dag.tags, dag_id
        assert dag.doc_md and len(dag.doc_md) > 100, dag_id
        assert dag.start_date.tzinfo is not None, dag_id
        for task in dag.tasks:
            assert task.owner not in (None, "", "airflow"), (dag_id, task.task_id)
            assert task.retries >= 1, (dag_id, task.task_id)
            assert task.execution_timeout is not None, (dag_id, task.task_id)


def test_no_cycles_and_stage_order(dagbag):
    from airflow.utils.dag_cycle_tester import check_cycle

    for dag in dagbag.dags.values():
        check_cycle(dag)
    ingest = dagbag.dags["affluent_ingest_chu_laurentides"]
    chain = ["select_batch", "ingest", "pseudonymise", "validate", "land"]
    for upstream, downstream in zip(chain, chain[1:]):
        assert downstream in ingest.get_task(upstream).downstream_task_ids
    assert {o.name for o in ingest.get_task("land").outlets} == {
        f"affluent.silver.{d}" for d in ("patient", "encounter", "diagnosis", "lab_result", "medication", "consent",
                                         "observation")}


def test_publish_is_scheduled_on_silver_assets(dagbag):
    publish = dagbag.dags["affluent_publish"]
    assert "affluent.silver.encounter" in repr(publish.timetable.asset_condition)


def test_adding_an_establishment_file_adds_its_dag(tmp_path, monkeypatch):
    import shutil

    config = tmp_path / "config"
    shutil.copytree(Path(__file__).resolve().parents[1] / "config", config)
    new = (config / "establishments" / "hopital_riviere.yaml").read_text(encoding="utf-8")
    (config / "establishments" / "clinique_nord.yaml").write_text(
        new.replace("id: hopital_riviere", "id: clinique_nord").replace("landing_folder: hopital_riviere",
                                                                        "landing_folder: clinique_nord"),
        encoding="utf-8")
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    monkeypatch.setenv("AFFLUENT_CONFIG_DIR", str(config))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS / "affluent_ingest.py"))
    assert "affluent_ingest_clinique_nord" in bag.dag_ids


def test_a_failure_no_retry_can_fix_fails_the_task_at_once_and_others_are_retried(dagbag, monkeypatch):
    import runpy

    from airflow.sdk.exceptions import AirflowFailException

    from jobs.stages import pipeline
    from jobs.core.batchlog import BatchRejected, Stage

    module = runpy.run_path(str(DAGS / "affluent_ingest.py"))
    monkeypatch.setitem(module["_run_stage"].__globals__, "task_context", lambda: None)

    def rejected(ctx, establishment_id, batch_id):
        raise BatchRejected(establishment_id, batch_id, "batch.quarantined_rate: 30 of 100 rows quarantined")

    monkeypatch.setattr(pipeline, "validate", rejected)
    with pytest.raises(AirflowFailException, match=r"validate of chu_laurentides/b1 stopped: .*batch\.quarantined_rate"):
        module["_run_stage"](Stage.VALIDATE, "chu_laurentides", "b1")

    def flaky(ctx, establishment_id, batch_id):
        raise OSError("connection reset by the storage")

    monkeypatch.setattr(pipeline, "land", flaky)
    with pytest.raises(OSError):
        module["_run_stage"](Stage.LAND, "chu_laurentides", "b1")


def test_select_batch_fails_with_the_reason_when_a_stopped_batch_blocks_the_queue(dagbag, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from jobs.stages import pipeline
    from jobs.stages.batch_queue import EstablishmentQueue, QueuedBatch
    from jobs.core.batchlog import QueueState

    select = dagbag.dags["affluent_ingest_chu_laurentides"].get_task("select_batch").python_callable
    monkeypatch.setitem(select.__globals__, "task_context", lambda: None)
    monkeypatch.setitem(select.__globals__, "get_current_context", lambda: {"params": {"batch_id": None}})

    def queue_of(*batches):
        monkeypatch.setattr(pipeline, "queue", lambda ctx, est: EstablishmentQueue(est, batches))

    queue_of(QueuedBatch("b1", QueueState.LANDED), QueuedBatch("b2", QueueState.IN_PROGRESS),
             QueuedBatch("b3", QueueState.WAITING))
    assert select() == "b2"
    queue_of(QueuedBatch("b1", QueueState.BLOCKED, "stopped: batch.quarantined_rate", "validate"),
             QueuedBatch("b2", QueueState.WAITING))
    with pytest.raises(AirflowFailException, match=r"blocked by b1, blocked at validate: stopped: batch\.quarantined_rate"):
        select()
    queue_of(QueuedBatch("b1", QueueState.LANDED))
    with pytest.raises(AirflowSkipException, match="nothing waiting"):
        select()


def test_select_batch_warns_of_a_paused_publish_and_of_a_manual_run_that_waited(dagbag, monkeypatch, tmp_path, caplog):
    import datetime as dt
    import logging
    from types import SimpleNamespace

    from jobs.stages import pipeline
    from jobs.stages.batch_queue import EstablishmentQueue, QueuedBatch
    from jobs.core.batchlog import QueueState
    from jobs.core.lake import Lake

    select = dagbag.dags["affluent_ingest_chu_laurentides"].get_task("select_batch").python_callable
    ctx = SimpleNamespace(lake=Lake(str(tmp_path / "lake")), consortium=SimpleNamespace(projects={}))
    ti = SimpleNamespace(get_dag=lambda dag_id: SimpleNamespace(is_paused=dag_id == "affluent_publish"))
    requested = dt.datetime(2026, 6, 15, 8, tzinfo=dt.timezone.utc)
    run = SimpleNamespace(run_type="manual", run_after=requested, start_date=requested + dt.timedelta(minutes=5))
    monkeypatch.setitem(select.__globals__, "task_context", lambda: ctx)
    monkeypatch.setitem(select.__globals__, "get_current_context",
                        lambda: {"params": {"batch_id": None}, "ti": ti, "dag_run": run})
    monkeypatch.setattr(pipeline, "queue", lambda c, est: EstablishmentQueue(est, (QueuedBatch("b1", QueueState.WAITING),)))
    with caplog.at_level(logging.WARNING):
        assert select() == "b1"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("affluent_publish is PAUSED" in w for w in warnings), warnings
    assert not any("affluent_maintenance is PAUSED" in w for w in warnings)
    assert any("started 300 s later" in w for w in warnings), warnings


def test_every_task_that_writes_silver_or_extracts_runs_in_the_one_slot_writers_pool(dagbag):
    from jobs.core.registry import LAKE_WRITERS_POOL, LAKE_WRITERS_POOL_SLOTS

    writers = set()
    for dag_id, dag in dagbag.dags.items():
        for task in dag.tasks:
            # land MERGEs into silver; publish rewrites extracts and gold; maintenance erases, purges and vacuums.
            writes = task.task_id == "land" or dag_id in ("affluent_publish", "affluent_maintenance")
            assert (task.pool == LAKE_WRITERS_POOL) == writes, (dag_id, task.task_id, task.pool)
            if writes:
                writers.add((dag_id, task.task_id))
    assert {("affluent_publish", "publish"), ("affluent_maintenance", "erasures"),
            ("affluent_maintenance", "compaction"), ("affluent_ingest_chu_laurentides", "land")} <= writers
    assert LAKE_WRITERS_POOL_SLOTS == 1
    compose = (DAGS.parent / "docker-compose.yml").read_text(encoding="utf-8")
    assert f"airflow pools set {LAKE_WRITERS_POOL} {LAKE_WRITERS_POOL_SLOTS} " in compose


def test_publish_and_maintenance_run_from_the_start(dagbag):
    """Paused at creation, publish would let a land's Asset events pass and erasure would wait forever."""
    assert not dagbag.dags["affluent_publish"].is_paused_upon_creation
    assert not dagbag.dags["affluent_maintenance"].is_paused_upon_creation


def test_dags_show_the_establishment_name_and_every_task_says_what_it_reads_and_writes(dagbag):
    from jobs.core.config import load_consortium

    consortium = load_consortium(Path(__file__).resolve().parents[1] / "config")
    for est in consortium.establishments.values():
        dag = dagbag.dags[f"affluent_ingest_{est.id}"]
        assert est.name in dag.dag_display_name
        for task in dag.tasks:
            assert task.doc_md and len(task.doc_md) > 80, task.task_id
            if task.task_id != "select_batch":
                assert "**Reads**" in task.doc_md and "**Writes**" in task.doc_md and "Re-run" in task.doc_md
    assert "silver/consent" in dagbag.dags["affluent_publish"].doc_md


def test_task_retries_come_soon_and_are_configurable(monkeypatch, dagbag):
    """A task that finds the Spark service restarting is retried within a minute; the environment can say otherwise."""
    from datetime import timedelta

    from jobs.core.registry import ENV_TASK_RETRIES, ENV_TASK_RETRY_DELAY, retry_args

    for dag in dagbag.dags.values():
        for task in dag.tasks:
            assert task.retry_delay <= timedelta(minutes=1), (dag.dag_id, task.task_id)
    monkeypatch.setenv(ENV_TASK_RETRIES, "5")
    monkeypatch.setenv(ENV_TASK_RETRY_DELAY, "7")
    assert retry_args() == {"retries": 5, "retry_delay": timedelta(seconds=7)}
    monkeypatch.setenv(ENV_TASK_RETRY_DELAY, "soon")
    with pytest.raises(ValueError, match=ENV_TASK_RETRY_DELAY):
        retry_args()
