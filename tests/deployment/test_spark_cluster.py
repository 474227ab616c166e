"""Delta on a Spark standalone cluster, reached the way the deployed DAGs reach it.

The cluster (master + one worker, from the pyspark distribution) runs on
127.0.0.1; the application gets its master from the ``spark_default`` Airflow
connection (``AIRFLOW_CONN_SPARK_DEFAULT=spark://127.0.0.1:<port>``) through
``jobs.stages.pipeline.spark_master_from_connection`` and its session from the
project's session factory.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster_run(spark_cluster, tmp_path_factory):
    """One Spark application on the cluster runs a batch through every stage, then a Delta write/read/MERGE.

    Started when collection ended if the session selected these tests (tests/deployment/conftest.py).
    """
    from tests.deployment.conftest import cluster_app_result

    result, lake_root = cluster_app_result(spark_cluster, tmp_path_factory)
    print(f"master used: {result['master']} (application {result['application_id']})")
    return result, lake_root


def test_delta_write_read_merge_on_a_standalone_cluster(spark_cluster, cluster_run):
    result, lake_root = cluster_run
    delta = result["delta"]

    assert spark_cluster.connection_uri.startswith("spark://127.0.0.1:")
    assert result["master"] == spark_cluster.master_url
    assert result["executors"] == 1
    assert delta["table"].startswith(lake_root)
    assert delta["rows_written"] == 10
    assert delta["rows_after_merge"] == {"first": 5, "merged": 10}
    assert delta["history"] == ["WRITE", "MERGE"]
    # The master's own record: the application ran there, with the worker's executor.
    apps = {app["id"]: app for app in spark_cluster.state()["completedapps"]}
    assert result["application_id"] in apps
    assert apps[result["application_id"]]["state"] == "FINISHED"


def test_a_batch_runs_end_to_end_on_the_cluster(spark_cluster, cluster_run):
    result, _ = cluster_run
    batch = result["batch"]

    assert result["master"] == spark_cluster.master_url
    assert batch["executors"] == 1
    assert batch["stages"] == ["ingest", "land", "pseudonymise", "validate"]
    assert batch["silver_rows"]["patient"] > 0 and batch["silver_rows"]["encounter"] > 0
    checks = batch["reconciliation"]
    assert {c["dataset"] for c in checks} >= {"patient", "encounter", "diagnosis", "lab_result", "medication"}
    assert all(c["holds"] for c in checks), checks
    assert all(c["batch_id"] == batch["batch_id"] for c in checks)
