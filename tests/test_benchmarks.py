"""The benchmark script runs end to end on its smoke size (one establishment, 40 patients) and writes its results.

No timing is asserted: figures depend on the machine. What must hold is that
every phase ran and the JSON carries the keys the docs and the plot read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_KEY

pytestmark = [pytest.mark.integration, pytest.mark.benchmark]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RATIOS = {"pipeline_overhead", "validation", "incremental", "erasure", "orchestration", "researcher_query"}
STAGE_KEYS = {"rows", "seconds", "rows_per_second", "peak_memory", "calls"}


@pytest.fixture(scope="module")
def tiny_completed(tmp_path_factory) -> tuple[dict, str]:
    """The smoke run's results and what it printed."""
    root = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, AFFLUENT_PSEUDONYM_KEY=TEST_KEY, AFFLUENT_SHUFFLE_PARTITIONS="2")
    env.pop("AFFLUENT_PSEUDONYM_KEY_FILE", None)
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--size", "tiny", "--out", str(root / "out"),
         "--work", str(root / "work"), "--no-doc", "--no-plot"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads((root / "out" / "tiny.json").read_text(encoding="utf-8")), completed.stdout


@pytest.fixture(scope="module")
def tiny_run(tiny_completed) -> dict:
    return tiny_completed[0]


def test_the_run_completes_with_every_ratio(tiny_run):
    assert tiny_run["complete"] is True
    assert RATIOS <= set(tiny_run["ratios"])
    for name in RATIOS:
        assert "ratio" in tiny_run["ratios"][name], name


def test_every_stage_of_both_batches_and_the_dag_is_measured(tiny_run):
    steps = tiny_run["stages"]
    for prefix in ("full", "incremental", "dag"):
        for stage in ("ingest", "pseudonymise", "validate", "land"):
            assert STAGE_KEYS <= set(steps[f"{prefix}.{stage}"]), f"{prefix}.{stage}"
    assert steps["full.ingest"]["rows"] > 0
    assert steps["bare_copy"]["rows"] > 0
    assert steps["publish"]["rows"] > 0
    assert set(steps["full.ingest"]["peak_memory"]) == {"python_mb", "jvm_mb", "total_mb"}
    assert steps["full.ingest"]["peak_memory"]["jvm_mb"] > 0


def test_the_dag_tasks_are_clients_of_one_service_compared_with_the_warm_session(tiny_run):
    orchestration = tiny_run["ratios"]["orchestration"]
    tasks = [task for per_dag in orchestration["tasks"].values() for task in per_dag.values()]
    assert len(tasks) == 5
    # No task process started a JVM of its own: their Spark work ran in the service.
    assert all(task["peak_memory"]["jvm_mb"] == 0 for task in tasks), tasks
    assert all(task["peak_memory"]["python_mb"] > 0 for task in tasks), tasks
    warm = sum(tiny_run["stages"][f"incremental.{stage}"]["seconds"]
               for stage in ("ingest", "pseudonymise", "validate", "land"))
    assert orchestration["warm_session_stage_seconds"] == pytest.approx(warm, abs=0.05)
    assert orchestration["ratio"] == pytest.approx(orchestration["dag_wall_seconds"] / warm, abs=0.011)


def test_erasure_removes_the_person_at_both_sizes(tiny_run):
    erasure = tiny_run["ratios"]["erasure"]
    for layout in ("as_landed", "clustered_by_person"):
        low, high = erasure[f"{layout}.x1"], erasure[f"{layout}.x10"]
        assert low["rows_deleted"] > 0
        assert high["rows_deleted"] == low["rows_deleted"]  # the other copies are other persons
        assert high["silver_rows"] == 10 * low["silver_rows"]


def test_spark_jobs_are_profiled_per_stage(tiny_run):
    assert tiny_run["profile"]["full.ingest"]["spark_jobs"] > 0


def test_the_delta_commits_of_every_batch_are_counted_and_printed(tiny_completed):
    results, printed = tiny_completed
    per_batch = results["delta_commits_per_batch"]
    stages = ("ingest", "pseudonymise", "validate", "land")
    for batch, steps in (("full", stages), ("incremental", stages), ("dag", ("select_batch", *stages))):
        made = per_batch[batch]
        assert set(made["per_stage"]) == set(steps), batch
        assert made["total"] == sum(made["per_stage"].values()) == sum(made["per_zone"].values()) > 0, batch
        assert f"Delta commits per batch ({batch}, 1 establishment(s)): {made['total']}" in printed
    full = per_batch["full"]
    assert full["per_stage"]["ingest"] > 0 and full["per_stage"]["land"] > 0
    assert {"bronze", "silver"} <= set(full["per_zone"])
    assert results["stages"]["full.land"]["delta_commits"] == full["per_stage"]["land"]
    # The DAG's tasks commit from processes of their own: their commits are read from the lake all the same.
    assert per_batch["dag"]["per_stage"]["land"] > 0
    # The bare copy writes outside the lake: no commit of it is counted as the pipeline's.
    assert results["stages"]["bare_copy"]["delta_commits"] == 0


def test_the_result_names_the_commit_measured(tiny_run):
    code = tiny_run["code"]
    assert len(code["commit"]) == 40 and code["short"] == code["commit"][:10]
    # The commit measured is this checkout's, or one before it (when commits were made during the run).
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", code["commit"], "HEAD"], cwd=PROJECT_ROOT)
    assert ancestor.returncode == 0, code
    assert isinstance(code["dirty"], bool)


def test_commits_are_read_from_the_log_as_delta_history_counts_them(spark, tmp_path):
    from delta.tables import DeltaTable

    from benchmarks.probe import commits_by_zone, delta_commits, delta_versions

    silver, gold = str(tmp_path / "silver" / "visit"), str(tmp_path / "gold" / "counts")
    spark.range(3).write.format("delta").save(silver)
    before = delta_versions(tmp_path)
    spark.range(3, 5).write.format("delta").mode("append").save(silver)
    DeltaTable.forPath(spark, silver).delete("id = 0")
    spark.range(2).write.format("delta").save(gold)
    made = delta_commits(before, delta_versions(tmp_path))

    history = DeltaTable.forPath(spark, silver).history().count()
    assert made == {"gold/counts": 1, "silver/visit": history - 1} == {"gold/counts": 1, "silver/visit": 2}
    assert commits_by_zone(made) == {"gold": 1, "silver": 2}


def test_fhir_bundles_and_ndjson_are_measured_per_1000_entries(tmp_path):
    """The Bundle benchmark at a smoke size: both formats ingested, every entry accounted for."""
    out = tmp_path / "fhir_bundles.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.fhir_bundles", "--bundles", "2", "--encounters", "2",
         "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=PROJECT_ROOT, env=dict(os.environ, AFFLUENT_SHUFFLE_PARTITIONS="2"), capture_output=True, text=True,
        timeout=1800)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    figures = json.loads(out.read_text(encoding="utf-8"))
    entries = 2 * (1 + 2 * 16)  # per Bundle: the Patient, 16 entries per encounter
    assert figures["entries"] == entries
    for label in ("bundles", "ndjson"):
        assert figures[label]["per_1000_entries"] > 0
        assert figures[label]["not_collected"] == 2 * 2 * 5  # five types not collected per encounter
    # The same content either way: the same bronze rows (a blood-pressure panel lands its two components).
    assert figures["bundles"]["bronze_rows"] == figures["ndjson"]["bronze_rows"] == 2 * (1 + 2 * 12)
    assert figures["bundles"]["quarantined"] == figures["ndjson"]["quarantined"] == 0
    assert figures["ratio_bundles_to_ndjson"] > 0
    assert "Bundles / NDJSON" in completed.stdout
