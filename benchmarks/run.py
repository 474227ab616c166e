"""Benchmark the real stages on a synthetic consortium, with six side-by-side ratios.

Usage::

    .venv/bin/python -m benchmarks.run --size small          # ~300 patients, minutes
    AFFLUENT_DRIVER_MEMORY=12g .venv/bin/python -m benchmarks.run --size 1m

Generates the consortium (once per size, reused while its parameters hold)
under ``.cache/bench/<size>/consortium``, builds a fresh lake beside it and
runs, in one warm Spark session:

1. a bare Spark copy of the first (full) batch's files into Delta, then the
   four stages on the same batch — *pipeline overhead*;
2. the second batch (incremental) — *incremental* versus full;
3. the third batch through the first establishment's ingest DAG with ``dag.test()``
   — *orchestration*: DAG wall time versus the stage functions inside it;
4. publish, then a researcher query on both engines — *researcher query*;
5. GX versus the single-pass Spark translation of the same suites
   (:func:`jobs.validate.measure_engines`) — *validation*;
6. one person erased from silver copies of N and 10×N rows, as landed and
   clustered by ``person_id`` — *erasure*.

Each measured step records rows, seconds, rows per second and peak memory
(Python + driver JVM resident memory). Results go to ``<out>/<size>.json``
(rewritten after every phase, ``complete`` set at the end), then the Markdown
results in ``docs/benchmarks.md`` and ``<out>/throughput.png`` are rebuilt
from every size's JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.probe import Clock, MemorySampler, spark_jobs_by_group  # noqa: E402
from jobs.settings import PROJECT_ROOT  # noqa: E402


@dataclass(frozen=True)
class Size:
    patients: int
    batches: int
    driver_memory: str
    # Erasure is measured on silver copies of N × factor rows (factors applied to the landed silver).
    erasure_factors: tuple[float, float]
    repeats: int
    # How many establishments go through the measured stages (0: all); the test suite's smoke run takes one.
    sites: int = 0


SIZES = {
    # A smoke run for the test suite: every phase and ratio, one establishment, seconds of data.
    "tiny": Size(40, 3, "1g", (1, 10), 1, sites=1),
    "small": Size(300, 3, "2g", (1, 10), 3),
    "100k": Size(100_000, 3, "8g", (0.1, 1), 3),
    "1m": Size(1_000_000, 3, "12g", (0.1, 1), 2),
}
SEED = 20260105
DEFECT_RATE = 0.01
DEFAULT_OUT = PROJECT_ROOT / "docs" / "benchmarks"
DEFAULT_DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
BENCH_ROOT = PROJECT_ROOT / ".cache" / "bench"
GENERATION_RECORD = "generation.json"

STAGES = ("ingest", "pseudonymise", "validate", "land")
RESEARCHER = ("diabetes_outcomes", "alice.tremblay")
QUERIES = {
    # The demo's query: a join and a distinct count.
    "join_distinct": ("SELECT p.year_of_birth DIV 10 * 10 AS decade, COUNT(DISTINCT d.person_id) AS patients "
                      "FROM diagnosis d JOIN patient p ON d.person_id = p.person_id GROUP BY 1 ORDER BY 1"),
    # A scan of the largest extract.
    "scan_aggregate": ("SELECT measurement_source_value, COUNT(*) AS n, AVG(value_as_number) AS mean_value "
                       "FROM lab_result GROUP BY 1 ORDER BY 1"),
}


def say(message: str, clock: Clock | None = None) -> None:
    stamp = f"[{clock():7.1f}s] " if clock else ""
    print(f"[bench] {stamp}{message}", flush=True)


# ---------------------------------------------------------------- record ----

class Recorder:
    """Times steps, samples their peak memory, tags their Spark jobs, and keeps the results."""

    def __init__(self, spark, memory: MemorySampler, clock: Clock):
        self.spark = spark
        self.memory = memory
        self.clock = clock
        self.steps: dict[str, dict] = {}
        self.on_step = lambda: None  # called after every step, e.g. to save partial results

    @contextmanager
    def step(self, name: str, rows: int | None = None):
        """Measure one step; the body may set ``box['rows']``. Repeated names accumulate."""
        box = {"rows": rows}
        self.spark.sparkContext.setJobGroup(name, name)
        self.memory.reset()
        started = time.perf_counter()
        try:
            yield box
        finally:
            seconds = time.perf_counter() - started
            self.spark.sparkContext.setJobGroup("(none)", "")
            self.memory.sample()
            peak = self.memory.peak.as_dict()
            entry = self.steps.setdefault(name, {"rows": 0, "seconds": 0.0, "calls": 0, "peak_memory": peak})
            entry["rows"] += int(box["rows"] or 0)
            entry["seconds"] += seconds
            entry["calls"] += 1
            entry["peak_memory"] = {k: max(entry["peak_memory"][k], v) for k, v in peak.items()}
            entry["rows_per_second"] = round(entry["rows"] / entry["seconds"]) if entry["seconds"] else None
            say(f"{name}: {box['rows'] if box['rows'] is not None else '-'} rows in {seconds:.2f} s "
                f"(peak {peak['total_mb']} MB)", self.clock)
            self.on_step()

    def seconds(self, *names: str) -> float:
        return sum(self.steps[n]["seconds"] for n in names if n in self.steps)

    def rows(self, name: str) -> int:
        return self.steps.get(name, {}).get("rows", 0)

    def table(self) -> dict[str, dict]:
        return {name: dict(entry, seconds=round(entry["seconds"], 3)) for name, entry in self.steps.items()}


def stage_rows(stage: str, summary: dict) -> int:
    """Rows a stage read, from its JSON-able summary (0 when it skipped)."""
    if summary.get("skipped"):
        return 0
    if stage == "ingest":
        return sum(summary["bronze"].values()) + sum(summary["quarantined"].values())
    if stage == "pseudonymise":
        return sum(summary["staged"].values()) + sum(summary["duplicates"].values())
    if stage == "validate":
        return sum(d["rows"] for d in summary["datasets"].values())
    if stage == "land":
        return sum(summary["landed"].values())
    if stage == "publish":
        return sum(sum(counts.values()) for counts in summary["extracts"].values())
    raise ValueError(f"unknown stage {stage!r}")


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 2) if denominator else None


# ------------------------------------------------------------ consortium ----

def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ensure_consortium(work: Path, size: Size, consortium, clock: Clock) -> dict:
    """Generate the consortium once per size; reuse it while patients, batches, seed and defects hold."""
    from jobs.generate import generate_consortium

    out = work / "consortium"
    wanted = {"patients": size.patients, "batches": size.batches, "seed": SEED, "defect_rate": DEFECT_RATE}
    record = out / GENERATION_RECORD
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved.get("parameters") == wanted:
            say(f"reusing the consortium in {out} (generated in {saved['seconds']:.0f} s)", clock)
            return saved | {"reused": True}
    shutil.rmtree(out, ignore_errors=True)
    say(f"generating {size.patients} patients, {size.batches} batches in {out} …", clock)
    summary = generate_consortium(out, consortium, patients=size.patients, batches=size.batches, seed=SEED,
                                  defect_rate=DEFECT_RATE)
    rows = {b: sum(sum(summary.rows[e].get(b, {}).values()) for e in summary.rows) for b in summary.batch_ids}
    saved = {"parameters": wanted, "seconds": round(summary.seconds, 1), "batch_ids": summary.batch_ids,
             "rows_per_batch": rows, "rows_by_file": summary.rows, "defects": summary.defects,
             "landing_bytes": folder_bytes(out / "landing")}
    record.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    say(f"generated {sum(rows.values())} rows in {summary.seconds:.0f} s", clock)
    return saved | {"reused": False}


# ------------------------------------------------------------- bare copy ----

# Spark's CSV reader takes only a few charset names; the nearest one is enough to time a plain read.
SPARK_CHARSETS = {"latin-1": "iso-8859-1", "utf-8-sig": "utf-8", "cp1252": "iso-8859-1",
                  "windows-1252": "iso-8859-1"}


def measured_establishments(consortium, size: Size) -> list[str]:
    ids = sorted(consortium.establishments)
    return ids[:size.sites] if size.sites else ids


def bare_copy(spark, landing: Path, consortium, batch_id: str, target: Path, establishments: list[str]) -> int:
    """The batch's files read by Spark and written to Delta, nothing else; rows written."""
    from delta.tables import DeltaTable

    from jobs.config import CsvProfile

    rows = 0
    for est_id in establishments:
        est = consortium.establishments[est_id]
        manifest = json.loads((landing / est.landing_folder / batch_id / "manifest.json").read_text("utf-8"))
        for entry in manifest["files"]:
            if entry["dataset"] == "bundle":
                continue
            path = str(landing / est.landing_folder / batch_id / entry["path"])
            profile = est.input
            if isinstance(profile, CsvProfile):
                frame = (spark.read.option("header", "true").option("sep", profile.delimiter)
                         .option("quote", profile.quote).option("encoding", SPARK_CHARSETS.get(profile.encoding, profile.encoding)).csv(path))
            else:
                frame = spark.read.json(path)
            destination = str(target / est_id / entry["dataset"])
            frame.write.format("delta").mode("overwrite").save(destination)
            metrics = DeltaTable.forPath(spark, destination).history(1).select("operationMetrics").first()[0]
            rows += int(metrics.get("numOutputRows", 0))
    return rows


# -------------------------------------------------------------- erasure ----

def erasure_target(spark, ctx, truth: Path, attempts: int = 200) -> tuple[str, str, str]:
    """(establishment, patient reference, person_id) of a patient present in silver."""
    from pyspark.sql import functions as F

    from jobs.erasure import patient_key_of

    patients = spark.read.format("delta").load(ctx.lake.silver("patient"))
    with truth.open(encoding="utf-8") as handle:
        for _, line in zip(range(attempts), handle):
            for site in json.loads(line)["establishments"]:
                key = patient_key_of(ctx.key, site["establishment"], site["patient_ref"])
                found = (patients.where((F.col("establishment_id") == site["establishment"])
                                        & (F.col("patient_key") == key) & F.col("person_id").isNotNull())
                         .select("person_id").first())
                if found is not None:
                    return site["establishment"], site["patient_ref"], found.person_id
    raise RuntimeError(f"none of the first {attempts} persons of {truth} is in silver; is silver empty?")


def build_erasure_lake(spark, ctx, root: Path, factor: float, clustered: bool, person_id: str) -> int:
    """Silver copied ``factor`` times (other persons renamed per copy) into a lake of its own; rows written.

    A factor under 1 keeps that share of persons (always the one to erase).
    ``clustered`` writes each establishment's rows range-partitioned and sorted
    by ``person_id``, so each file holds a narrow range of persons and Delta's
    min/max statistics can skip the others.
    """
    from pyspark.sql import functions as F

    from jobs.lake import Lake
    from jobs.schemas import DATASETS

    lake = Lake(str(root))
    total = 0
    copies = max(1, round(factor))
    for dataset in DATASETS:
        source = ctx.lake.silver(dataset)
        silver = spark.read.format("delta").load(source)
        if factor < 1:
            keep = int(round(1 / factor))
            silver = silver.where((F.abs(F.hash("person_id")) % keep == 0) | (F.col("person_id") == person_id))
        parts = [silver]
        for copy in range(1, copies):
            renamed = silver.withColumn("person_id", F.concat(F.col("person_id"), F.lit(f"~{copy}")))
            if "patient_key" in silver.columns:
                renamed = renamed.withColumn("patient_key", F.concat(F.col("patient_key"), F.lit(f"~{copy}")))
            parts.append(renamed)
        frame = parts[0]
        for part in parts[1:]:
            frame = frame.unionByName(part)
        if clustered:
            files = max(1, spark.sparkContext.defaultParallelism * copies)
            frame = frame.repartitionByRange(files, "person_id").sortWithinPartitions("person_id")
        (frame.write.format("delta").mode("overwrite").partitionBy("establishment_id")
         .save(lake.silver(dataset)))
        total += int(spark.sql(f"DESCRIBE HISTORY delta.`{lake.silver(dataset)}` LIMIT 1")
                     .select("operationMetrics").first()[0].get("numOutputRows", 0))
    return total


def erasure_metrics(spark, root: Path, rows_removed: dict[str, int]) -> dict[str, int]:
    """Files of every silver table of an erasure lake after the erasure, and the silver rows it removed.

    The rows come from the erasure's own outcome: erasure forgets each touched
    table's log history (the MERGE commit's metrics with it), so that no old
    commit keeps the person's ids.
    """
    from delta.tables import DeltaTable

    from jobs.lake import Lake
    from jobs.schemas import DATASETS

    lake = Lake(str(root))
    files = sum(int(DeltaTable.forPath(spark, lake.silver(d)).detail().select("numFiles").first()[0] or 0)
                for d in DATASETS)
    deleted = sum(n for table, n in rows_removed.items() if table.startswith("silver."))
    return {"files_in_tables": files, "rows_deleted": deleted}


# ------------------------------------------------------------ the run ----

def setup_environment(work: Path, size: Size) -> dict[str, str]:
    """Airflow home, lake, landing and a throwaway key for synthetic data, as the demo sets them."""
    from jobs.demo import airflow_env

    os.environ.setdefault("AFFLUENT_DRIVER_MEMORY", size.driver_memory)
    if not os.environ.get("AFFLUENT_PSEUDONYM_KEY") and not os.environ.get("AFFLUENT_PSEUDONYM_KEY_FILE"):
        # Synthetic data and a lake rebuilt at every run: a fresh key each time is enough.
        os.environ["AFFLUENT_PSEUDONYM_KEY"] = secrets.token_hex(32)
    env = airflow_env(work)
    os.environ.update(env)
    return env


def run(size_name: str, out: Path, doc: Path | None, plot: bool, work: Path) -> dict:
    size = SIZES[size_name]
    clock = Clock()
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = setup_environment(work, size)
    for scratch in ("lake", "bare", "erasure", "eventlog", "scratch"):
        shutil.rmtree(work / scratch, ignore_errors=True)
    (work / "eventlog").mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / f"{size_name}.json"

    from jobs import pipeline
    from jobs.session import get_spark
    from jobs.settings import Settings

    ctx = pipeline.Context.from_env()
    results: dict = {
        "size": size_name, "complete": False, "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "parameters": {"patients": size.patients, "batches": size.batches, "seed": SEED, "defect_rate": DEFECT_RATE},
        "environment": {"cpus": os.cpu_count(), "memory_gb": round(__import__("psutil").virtual_memory().total / 2**30, 1),
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                        "driver_memory": os.environ["AFFLUENT_DRIVER_MEMORY"],
                        "shuffle_partitions": os.environ.get("AFFLUENT_SHUFFLE_PARTITIONS", "8"),
                        "python": platform.python_version()},
        "stages": {}, "ratios": {}, "profile": {},
    }

    def save() -> None:
        results["elapsed_seconds"] = round(clock(), 1)
        result_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")

    generation = ensure_consortium(work, size, ctx.consortium, clock)
    batch_full, batch_incremental, batch_dag = generation["batch_ids"][:3]
    results["generation"] = {k: generation[k] for k in ("seconds", "rows_per_batch", "landing_bytes", "defects",
                                                        "reused")}
    save()

    settings = Settings.from_env()
    spark = get_spark(settings, app_name="affluent-bench", extra_conf={
        "spark.eventLog.enabled": "true", "spark.eventLog.dir": f"file://{work / 'eventlog'}",
        "spark.eventLog.compress": "false"})
    results["environment"]["spark"] = spark.version
    results["environment"]["spark_master"] = spark.sparkContext.master
    with MemorySampler() as memory:
        rec = Recorder(spark, memory, clock)

        def keep_partial() -> None:
            results["stages"] = rec.table()
            save()

        rec.on_step = keep_partial
        with rec.step("warm_up") as box:
            spark.range(200_000).selectExpr("id", "sha2(cast(id as string), 256) AS h").write.format(
                "delta").save(str(work / "scratch" / "warm_up"))
            box["rows"] = 200_000

        # 1. Pipeline overhead: the bare copy, then the four stages, on the full batch.
        with rec.step("bare_copy") as box:
            box["rows"] = bare_copy(spark, settings.landing, ctx.consortium, batch_full, work / "bare",
                                    measured_establishments(ctx.consortium, size))
        for est in measured_establishments(ctx.consortium, size):
            for stage in STAGES:
                with rec.step(f"full.{stage}") as box:
                    box["rows"] = stage_rows(stage, getattr(pipeline, stage)(ctx, est, batch_full))
        pipeline_seconds = rec.seconds(*(f"full.{s}" for s in STAGES))
        results["ratios"]["pipeline_overhead"] = {
            "pipeline_seconds": round(pipeline_seconds, 2), "bare_copy_seconds": round(rec.seconds("bare_copy"), 2),
            "rows_read": rec.rows("full.ingest"), "bare_rows": rec.rows("bare_copy"),
            "ratio": ratio(pipeline_seconds, rec.seconds("bare_copy"))}
        results["stages"] = rec.table()
        save()

        # 2. Incremental batch, session warm.
        for est in measured_establishments(ctx.consortium, size):
            for stage in STAGES:
                with rec.step(f"incremental.{stage}") as box:
                    box["rows"] = stage_rows(stage, getattr(pipeline, stage)(ctx, est, batch_incremental))
        incremental_seconds = rec.seconds(*(f"incremental.{s}" for s in STAGES))
        rows_full, rows_incremental = rec.rows("full.ingest"), rec.rows("incremental.ingest")
        results["ratios"]["incremental"] = {
            "full_seconds": round(pipeline_seconds, 2), "incremental_seconds": round(incremental_seconds, 2),
            "full_rows": rows_full, "incremental_rows": rows_incremental,
            "rows_share": ratio(rows_incremental, rows_full), "ratio": ratio(incremental_seconds, pipeline_seconds),
            "seconds_per_1k_rows_full": ratio(1000 * pipeline_seconds, rows_full),
            "seconds_per_1k_rows_incremental": ratio(1000 * incremental_seconds, rows_incremental)}
        results["stages"] = rec.table()
        save()

        # 3. Orchestration: the third batch through one establishment's DAG.
        results["ratios"]["orchestration"] = orchestrate(env, ctx, rec, batch_dag, clock)
        results["stages"] = rec.table()
        save()

        # 4. Publish, then the researcher query on both engines.
        with rec.step("publish") as box:
            box["rows"] = stage_rows("publish", pipeline.publish_all(ctx))
        results["ratios"]["researcher_query"] = researcher_queries(ctx, rec, size.repeats)
        results["stages"] = rec.table()
        save()

        # 5. Validation engines on the full batch's staged rows.
        results["ratios"]["validation"] = validation_engines(spark, ctx, rec, batch_full)
        results["stages"] = rec.table()
        save()

        # 6. Erasure at N and 10×N rows, two layouts.
        results["ratios"]["erasure"] = erasure(spark, ctx, rec, work, size, clock)
        results["stages"] = rec.table()
        results["peak_memory"] = memory.overall.as_dict()
        save()

    spark.stop()
    results["profile"] = spark_jobs_by_group(work / "eventlog")
    results["complete"] = True
    save()
    say(f"results in {result_path}", clock)
    if doc is not None or plot:
        from benchmarks.report import render

        render(out, doc, plot)
    return results


def orchestrate(env: dict[str, str], ctx, rec: Recorder, batch_id: str, clock: Clock) -> dict:
    """The first establishment's ingest DAG on one batch (``dag.test()``), its stage functions timed inside."""
    from jobs import pipeline

    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    migrate_seconds = time.perf_counter() - started
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=env["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")

    originals = {stage: getattr(pipeline, stage) for stage in STAGES}

    def timed(stage):
        def call(ctx_, establishment_id, batch):
            with rec.step(f"dag.{stage}") as box:
                summary = originals[stage](ctx_, establishment_id, batch)
                box["rows"] = stage_rows(stage, summary)
            return summary
        return call

    walls: dict[str, float] = {}
    try:
        for stage in STAGES:
            setattr(pipeline, stage, timed(stage))
        # One establishment's DAG is enough: the ratio is per run, and the others' third batch stays pending.
        for est in sorted(ctx.consortium.establishments)[:1]:
            dag = bag.dags[f"affluent_ingest_{est}"]
            started = time.perf_counter()
            run = dag.test(run_conf={"batch_id": batch_id})
            walls[est] = time.perf_counter() - started
            if not str(run.state).endswith("success"):
                raise RuntimeError(f"{dag.dag_id} on batch {batch_id} ended {run.state}; see the task logs above")
            say(f"{dag.dag_id}: batch {batch_id} {run.state} in {walls[est]:.1f} s", clock)
    finally:
        for stage, fn in originals.items():
            setattr(pipeline, stage, fn)
    stage_seconds = rec.seconds(*(f"dag.{s}" for s in STAGES))
    dag_seconds = sum(walls.values())
    return {"dag_wall_seconds": round(dag_seconds, 2), "stage_seconds": round(stage_seconds, 2),
            "per_dag_seconds": {e: round(s, 2) for e, s in walls.items()},
            "airflow_db_migrate_seconds": round(migrate_seconds, 1),
            "ratio": ratio(dag_seconds, stage_seconds)}


def researcher_queries(ctx, rec: Recorder, repeats: int) -> dict:
    """Each query on DuckDB/delta-rs and on Spark SQL: one warm-up, then the median of ``repeats`` runs.

    An engine measurement, not the researcher path: researchers reach DuckDB
    only through the gateway (with output checking and audit), never Spark.
    Here the same checked SQL runs on the gateway's locked-down DuckDB and, for
    comparison, on Spark temporary views of the extracts.
    """
    project = ctx.consortium.projects[RESEARCHER[0]]
    out: dict[str, dict] = {}
    for name, sql in QUERIES.items():
        timings: dict[str, list[float]] = {"duckdb": [], "spark": []}
        rows: dict[str, int] = {}
        for engine in ("duckdb", "spark"):
            for attempt in range(repeats + 1):
                started = time.perf_counter()
                with rec.step(f"query.{name}.{engine}") if attempt else _nothing():
                    # Aggregated result (a few dozen rows at most): fetching it is what a researcher waits for.
                    rows[engine] = (_duckdb_rows(ctx, project, sql) if engine == "duckdb"
                                    else _spark_rows(ctx, project, sql))
                if attempt:
                    timings[engine].append(time.perf_counter() - started)
        duck, spark_s = statistics.median(timings["duckdb"]), statistics.median(timings["spark"])
        out[name] = {"duckdb_seconds": round(duck, 3), "spark_seconds": round(spark_s, 3), "rows": rows,
                     "ratio_spark_over_duckdb": ratio(spark_s, duck)}
    out["ratio"] = out["join_distinct"]["ratio_spark_over_duckdb"]
    return out


def _duckdb_rows(ctx, project, sql: str) -> int:
    from jobs import access

    checked = access.check_sql(sql, project, access.ENGINE_DUCKDB, {d: f"q_{d}" for d in project.datasets})
    con = access.locked_connection()
    try:
        access.register_project(con, ctx.lake, project)
        return access.fetch(con, checked.sql).num_rows
    finally:
        con.close()


def _spark_rows(ctx, project, sql: str) -> int:
    import sqlglot
    from delta.tables import DeltaTable

    for dataset in project.datasets:
        path = ctx.lake.project(project.id, dataset)
        if DeltaTable.isDeltaTable(ctx.spark, path):
            ctx.spark.read.format("delta").load(path).createOrReplaceTempView(dataset)
    return len(ctx.spark.sql(sqlglot.transpile(sql, read="duckdb", write="spark")[0]).collect())


@contextmanager
def _nothing():
    yield {}


def validation_engines(spark, ctx, rec: Recorder, batch_id: str) -> dict:
    """GX versus the generated Spark expressions on each dataset's staged rows of the full batch."""
    from pyspark.sql import functions as F

    from jobs.schemas import DATASETS
    from jobs.tables import table_exists
    from jobs.validate import measure_engines

    per_dataset: dict[str, dict] = {}
    for dataset in DATASETS:
        path = ctx.lake.staged(dataset)
        if not table_exists(spark, path):
            continue
        staged = spark.read.format("delta").load(path).where(F.col("_batch_id") == batch_id)
        with rec.step(f"validation_engines.{dataset}"):
            per_dataset[dataset] = {k: round(v, 3) for k, v in measure_engines(spark, staged, dataset,
                                                                                ctx.consortium).items()}
    gx = sum(d["gx"] for d in per_dataset.values())
    single_pass = sum(d["spark"] for d in per_dataset.values())
    validate_stage = rec.seconds("full.validate")
    return {"gx_seconds": round(gx, 2), "spark_single_pass_seconds": round(single_pass, 2),
            "validate_stage_seconds": round(validate_stage, 2), "per_dataset": per_dataset,
            "ratio_gx_over_spark": ratio(gx, single_pass),
            "ratio": ratio(validate_stage, single_pass)}


def erasure(spark, ctx, rec: Recorder, work: Path, size: Size, clock: Clock) -> dict:
    """One person erased (request + process, with VACUUM) from silver copies at two sizes and two layouts."""
    from jobs.erasure import process_erasures, request_erasure
    from jobs.lake import Lake

    est, patient_ref, person_id = erasure_target(spark, ctx, work / "consortium" / "ground_truth" / "persons.jsonl")
    out: dict[str, dict] = {}
    for layout, clustered in (("as_landed", False), ("clustered_by_person", True)):
        for factor in size.erasure_factors:
            label = f"{layout}.x{factor:g}"
            root = work / "erasure" / label
            with rec.step(f"erasure_setup.{label}") as box:
                box["rows"] = rows = build_erasure_lake(spark, ctx, root, factor, clustered, person_id)
            lake = Lake(str(root))
            with rec.step(f"erasure.{label}", rows=rows):
                request_erasure(spark, lake, ctx.key, est, patient_ref)
                outcome = process_erasures(spark, lake, ctx.consortium, ctx.key)
            if not outcome.processed:
                raise RuntimeError(f"erasure on {root} did not resolve the person: {outcome}")
            out[label] = {"silver_rows": rows, "seconds": round(rec.steps[f"erasure.{label}"]["seconds"], 2),
                          **erasure_metrics(spark, root, outcome.rows_removed)}
            shutil.rmtree(root / "silver", ignore_errors=True)
    low, high = (f"x{f:g}" for f in size.erasure_factors)
    for layout in ("as_landed", "clustered_by_person"):
        a, b = out[f"{layout}.{low}"], out[f"{layout}.{high}"]
        out[f"{layout}.ratio_10n_over_n"] = ratio(b["seconds"], a["seconds"])
    out["ratio"] = out["as_landed.ratio_10n_over_n"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for <size>.json and the plot")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default .cache/bench/<size>)")
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="Markdown file whose results are rebuilt")
    parser.add_argument("--no-doc", action="store_true", help="leave the Markdown results alone")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the throughput plot")
    args = parser.parse_args(argv)
    run(args.size, args.out.resolve(), None if args.no_doc else args.doc, not args.no_plot,
        args.work or BENCH_ROOT / args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
