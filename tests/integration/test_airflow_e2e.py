"""Quick-start command 1 at a small size: the real DAGs through Airflow, end to end.

The demo (tests/integration/conftest.py) ran in a subprocess with its own
Airflow home on SQLite, every task a client of the Spark service it started;
these tests check what it printed, silver, quarantine and a project extract
from this process, and that running a DAG run again for a landed batch changes
no table.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs.core.lake import Lake
from tests.integration.conftest import demo_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_demo_ends_with_the_summary_and_the_query_result(demo):
    stdout = demo.stdout
    assert "Batches landed" in stdout
    assert "Starting the researcher gateway" in stdout and "(audit event " in stdout
    assert "affluent_ingest_chu_laurentides: batch 20260105-001 success" in stdout.replace("DagRunState.", "")
    assert "Validation reports" in stdout
    # The researcher's question is differentially private: one row per visit concept, its intervals and ε.
    assert "visit_concept_id" in stdout and "visits_low95" in stdout and "spent epsilon" in stdout
    assert "9202" in stdout and "visit_source_value" not in stdout.split("Starting the researcher gateway")[1]


def test_the_demo_ran_every_dag_on_one_spark_jvm_the_service_s(demo):
    """After each DAG run the demo lists the Spark JVMs: the service's one, none in its own process or tasks."""
    stdout = demo.stdout
    assert "Spark: started the service at sc://localhost:" in stdout
    census = [line for line in stdout.splitlines() if "Spark JVMs:" in line]
    runs = re.findall(r"^\[affluent demo\] affluent_(?:ingest_\w+: batch \S+|publish) \S+ in \d+ s", stdout, re.M)
    assert runs and len(census) == len(runs), stdout[-3000:]  # one census after each DAG run
    for line in census:
        assert "Spark JVMs: 1 — the service's: 1 (pids " in line and line.endswith("its tasks: 0"), line
    assert "stopped the Spark service the demo started" in stdout


def test_pooled_visits_mean_one_thing_across_establishments(demo, spark):
    """Silver: each source value has one visit concept, and outpatient visits sent as words by the CSV
    establishments and as FHIR's ActCode by the FHIR one are one concept."""
    lake = Lake(str(demo.lake_root))
    encounters = spark.read.format("delta").load(lake.silver("encounter"))
    pairs = {(r.establishment_id, r.visit_source_value, r.visit_concept_id) for r in encounters.select(
        "establishment_id", "visit_source_value", "visit_concept_id").distinct().collect()}
    per_source = Counter((e, v) for e, v, _ in pairs)
    assert all(n == 1 for n in per_source.values()), pairs
    outpatient = {(e, v) for e, v, c in pairs if c == 9202}
    assert len({e for e, _ in outpatient}) == 3 and len({v for _, v in outpatient}) >= 2, outpatient
    assert {c for _, _, c in pairs} <= {9201, 9202, 9203, 581476, 5083, 0}


def test_dags_landed_silver_quarantine_and_a_project_extract(demo, spark):
    lake = Lake(str(demo.lake_root))
    patients = spark.read.format("delta").load(lake.silver("patient"))
    assert {r.establishment_id for r in patients.select("establishment_id").distinct().collect()} == {
        "chu_laurentides", "hopital_riviere", "cisss_estuaire"}
    assert spark.read.format("delta").load(lake.quarantine()).count() > 0
    extract = spark.read.format("delta").load(lake.project("diabetes_outcomes", "diagnosis"))
    assert extract.count() > 0
    silver_ids = {r.person_id for r in patients.select("person_id").collect()}
    assert not silver_ids & {r.person_id for r in extract.select("person_id").collect()}  # project pseudonyms
    log = spark.read.format("delta").load(lake.ops("batch_log")).where(F.col("stage") == "land")
    for row in log.collect():
        assert row.rows_read == row.rows_landed + row.rows_quarantined + row.rows_duplicates, row


def test_a_second_run_of_the_same_dag_run_changes_no_table_and_warns_of_a_paused_publish(demo):
    """The run is made with affluent_publish paused: its select_batch log says so (then it is unpaused again)."""
    workdir = demo.workdir
    code = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from jobs.app.demo import airflow_env
        import os
        os.environ.update(airflow_env(Path({str(workdir)!r})))
        from airflow.dag_processing.dagbag import DagBag
        from airflow.models.dag import DagModel
        from airflow.utils import session
        with session.create_session() as s:
            assert s.query(DagModel).filter(DagModel.dag_id == "affluent_publish").update({{"is_paused": True}}) == 1
        from jobs.stages.pipeline import Context
        from jobs.core.tables import table_version
        from jobs.core.schemas import DATASETS
        ctx = Context.from_env()
        lake = ctx.lake
        paths = [lake.bronze(d) for d in DATASETS] + [lake.staged(d) for d in DATASETS] + \\
                [lake.silver(d) for d in DATASETS] + [lake.quarantine(), lake.ops("batch_log")]
        before = {{p: table_version(ctx.spark, p) for p in paths}}
        bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        run = bag.dags["affluent_ingest_chu_laurentides"].test(run_conf={{"batch_id": "20260105-001"}})
        after = {{p: table_version(ctx.spark, p) for p in paths}}
        with session.create_session() as s:
            s.query(DagModel).filter(DagModel.dag_id == "affluent_publish").update({{"is_paused": False}})
        print("RESULT=" + json.dumps({{"state": str(run.state), "same": before == after}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=demo_env(), capture_output=True, text=True,
                         timeout=900)
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT=")]
    assert result, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"same": true' in result[0] and "success" in result[0]
    logged = out.stdout + out.stderr
    assert "affluent_publish is PAUSED" in logged and "airflow dags unpause affluent_publish" in logged, logged[-3000:]
