"""Delta on a Spark standalone cluster, reached the way the deployed DAGs reach it.

The cluster (master + one worker, from the pyspark distribution) runs on
127.0.0.1; the application gets its master from the ``spark_default`` Airflow
connection (``AIRFLOW_CONN_SPARK_DEFAULT=spark://127.0.0.1:<port>``) through
``jobs.pipeline.spark_master_from_connection`` and its session from the
project's session factory.
"""

from __future__ import annotations

import pytest

from tests.deployment.workloads import delta_write_read_merge

pytestmark = pytest.mark.integration


def test_delta_write_read_merge_on_a_standalone_cluster(spark_cluster, run_in_cluster, tmp_path):
    lake_root = str(tmp_path / "lake")

    result = run_in_cluster(delta_write_read_merge, lake_root=lake_root)

    print(f"master used: {result['master']} (application {result['application_id']})")
    assert spark_cluster.connection_uri.startswith("spark://127.0.0.1:")
    assert result["master"] == spark_cluster.master_url
    assert result["executors"] == 1
    assert result["table"].startswith(lake_root)
    assert result["rows_written"] == 10
    assert result["rows_after_merge"] == {"first": 5, "merged": 10}
    assert result["history"] == ["WRITE", "MERGE"]
    # The master's own record: the application ran there, with the worker's executor.
    apps = {app["id"]: app for app in spark_cluster.state()["completedapps"]}
    assert result["application_id"] in apps
    assert apps[result["application_id"]]["state"] == "FINISHED"


def test_a_batch_runs_end_to_end_on_the_cluster(spark_cluster, run_in_cluster, tmp_path):
    from tests.deployment.workloads import one_batch_end_to_end

    result = run_in_cluster(one_batch_end_to_end, lake_root=str(tmp_path / "lake"))

    print(f"master used: {result['master']} (application {result['application_id']})")
    assert result["master"] == spark_cluster.master_url
    assert result["executors"] == 1
    assert result["stages"] == ["ingest", "land", "pseudonymise", "validate"]
    assert result["silver_rows"]["patient"] > 0 and result["silver_rows"]["encounter"] > 0
    checks = result["reconciliation"]
    assert {c["dataset"] for c in checks} >= {"patient", "encounter", "diagnosis", "lab_result", "medication"}
    assert all(c["holds"] for c in checks), checks
    assert all(c["batch_id"] == result["batch_id"] for c in checks)
