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
3. the third batch through every establishment's ingest DAG, each task in a
   process of its own (``airflow tasks test`` per task, in DAG order, as the
   LocalExecutor gives each task a process) — *orchestration*: DAG wall time
   versus the stage functions inside it;
4. publish, then a researcher query on both engines — *researcher query*;
5. GX versus the single-pass Spark translation of the same suites
   (:func:`jobs.stages.validate.measure_engines`) — *validation*;
6. one person erased from copies of the whole lake (every zone an erasure
   walks) with N and 10×N persons, as a plain write lays the files out and
   clustered by person — *erasure*.

Each measured step records rows, seconds, rows per second, peak memory
(Python + driver JVM resident memory) and the Delta commits it made in the
lake (every table of every zone); each measured batch adds those up into
its *Delta commits per batch*. Results go to ``<out>/<size>.json``
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

from benchmarks.probe import (Clock, MemorySampler, code_version, commits_by_zone, delta_commits,  # noqa: E402
                              delta_versions, spark_jobs_by_group)
from benchmarks.report import METHOD  # noqa: E402
from jobs.core.batchlog import PIPELINE_STAGES, Stage  # noqa: E402
from jobs.core.settings import PROJECT_ROOT  # noqa: E402


@dataclass(frozen=True)
class Size:
    patients: int
    batches: int
    driver_memory: str
    # Erasure is measured on lake copies of N × factor persons (factors applied to the landed lake's tables).
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

STAGES = tuple(stage.value for stage in PIPELINE_STAGES)
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
    """Times steps, samples their peak memory, tags their Spark jobs, counts their Delta commits, keeps the results.

    With ``lake`` set, every step also records the Delta commits it made under
    that root (``delta_commits``, per zone in ``delta_commits_by_zone``); the
    log is read before and after the timed span, outside it.
    """

    def __init__(self, spark, memory: MemorySampler, clock: Clock, lake: Path | None = None):
        self.spark = spark
        self.memory = memory
        self.clock = clock
        self.lake = lake
        self.steps: dict[str, dict] = {}
        self.on_step = lambda: None  # called after every step, e.g. to save partial results

    def versions(self) -> dict[str, int]:
        return delta_versions(self.lake) if self.lake is not None else {}

    def _count_commits(self, entry: dict, commits: dict[str, int] | None) -> None:
        if commits is None:
            return
        entry["delta_commits"] = entry.get("delta_commits", 0) + sum(commits.values())
        zones = entry.setdefault("delta_commits_by_zone", {})
        for zone, n in commits_by_zone(commits).items():
            zones[zone] = zones.get(zone, 0) + n

    @contextmanager
    def step(self, name: str, rows: int | None = None):
        """Measure one step; the body may set ``box['rows']``. Repeated names accumulate."""
        box = {"rows": rows}
        before = self.versions()
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
            commits = delta_commits(before, self.versions()) if self.lake is not None else None
            self._count_commits(entry, commits)
            made = f", {sum(commits.values())} Delta commits" if commits is not None else ""
            say(f"{name}: {box['rows'] if box['rows'] is not None else '-'} rows in {seconds:.2f} s "
                f"(peak {peak['total_mb']} MB{made})", self.clock)
            self.on_step()

    def add(self, name: str, rows: int, seconds: float, peak: dict[str, int],
            commits: dict[str, int] | None = None) -> None:
        """A step measured elsewhere (in another process): its rows, seconds, peak memory and Delta commits."""
        entry = self.steps.setdefault(name, {"rows": 0, "seconds": 0.0, "calls": 0, "peak_memory": dict(peak)})
        entry["rows"] += int(rows or 0)
        entry["seconds"] += seconds
        entry["calls"] += 1
        entry["peak_memory"] = {k: max(entry["peak_memory"][k], v) for k, v in peak.items()}
        entry["rows_per_second"] = round(entry["rows"] / entry["seconds"]) if entry["seconds"] else None
        self._count_commits(entry, commits)
        made = f", {sum(commits.values())} Delta commits" if commits is not None else ""
        say(f"{name}: {rows} rows in {seconds:.2f} s (peak {peak['total_mb']} MB{made}, measured in its own process)",
            self.clock)
        self.on_step()

    def seconds(self, *names: str) -> float:
        return sum(self.steps[n]["seconds"] for n in names if n in self.steps)

    def rows(self, name: str) -> int:
        return self.steps.get(name, {}).get("rows", 0)

    def commits(self, prefix: str, stages: tuple[str, ...]) -> dict:
        """One batch's Delta commits: the total and per stage (steps ``<prefix>.<stage>``), and per zone."""
        per_stage = {s: self.steps.get(f"{prefix}.{s}", {}).get("delta_commits", 0) for s in stages}
        zones: dict[str, int] = {}
        for s in stages:
            for zone, n in self.steps.get(f"{prefix}.{s}", {}).get("delta_commits_by_zone", {}).items():
                zones[zone] = zones.get(zone, 0) + n
        return {"total": sum(per_stage.values()), "per_stage": per_stage, "per_zone": dict(sorted(zones.items()))}

    def table(self) -> dict[str, dict]:
        return {name: dict(entry, seconds=round(entry["seconds"], 3)) for name, entry in self.steps.items()}


def stage_rows(stage: str, summary: dict) -> int:
    """Rows a stage read, from its JSON-able summary (0 when it skipped)."""
    if summary.get("skipped"):
        return 0
    if stage == Stage.INGEST:
        return sum(summary["bronze"].values()) + sum(summary["quarantined"].values())
    if stage == Stage.PSEUDONYMISE:
        return sum(summary["staged"].values()) + sum(summary["duplicates"].values())
    if stage == Stage.VALIDATE:
        return sum(d["rows"] for d in summary["datasets"].values())
    if stage == Stage.LAND:
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


def csv_header(path: Path, profile) -> list[str]:
    """The file's header line, split as the CSV reader splits it (the reader reads it in Python too)."""
    import csv

    with path.open(encoding=profile.encoding, newline="") as handle:
        return [name.strip() for name in next(csv.reader(handle, delimiter=profile.delimiter,
                                                          quotechar=profile.quote))]


def bare_copy(spark, landing: Path, consortium, batch_id: str, target: Path, establishments: list[str]) -> int:
    """The batch's files read by Spark with the pipeline's explicit schemas and written to Delta; rows written.

    No schema is inferred, as in the readers: a CSV file is read with its
    header's columns as strings (``jobs.readers.csv`` parses each line into
    ``c0 … cN string`` from the header), an NDJSON file with the explicit
    schema of its resource type (``jobs.readers.fhir_schema.RESOURCE_SCHEMAS``,
    permissive, corrupt records kept in ``_corrupt_record``).
    """
    from delta.tables import DeltaTable
    from pyspark.sql.types import StringType, StructField, StructType

    from jobs.core.config import CsvProfile
    from jobs.readers.fhir import DATASET_RESOURCES
    from jobs.readers.fhir_schema import JSON_OPTIONS, RESOURCE_SCHEMAS

    rows = 0
    for est_id in establishments:
        est = consortium.establishments[est_id]
        manifest = json.loads((landing / est.landing_folder / batch_id / "manifest.json").read_text("utf-8"))
        for entry in manifest["files"]:
            if entry["dataset"] == "bundle":
                continue
            file = landing / est.landing_folder / batch_id / entry["path"]
            profile = est.input
            if isinstance(profile, CsvProfile):
                schema = StructType([StructField(name, StringType(), True) for name in csv_header(file, profile)])
                frame = (spark.read.schema(schema).option("header", "true").option("sep", profile.delimiter)
                         .option("quote", profile.quote).option("escape", profile.quote)
                         .option("encoding", SPARK_CHARSETS.get(profile.encoding, profile.encoding)).csv(str(file)))
            else:
                frame = (spark.read.schema(RESOURCE_SCHEMAS[DATASET_RESOURCES[entry["dataset"]]])
                         .options(**JSON_OPTIONS).json(str(file)))
            destination = str(target / est_id / entry["dataset"])
            frame.write.format("delta").mode("overwrite").save(destination)
            metrics = DeltaTable.forPath(spark, destination).history(1).select("operationMetrics").first()[0]
            rows += int(metrics.get("numOutputRows", 0))
    return rows


# -------------------------------------------------------------- erasure ----

@dataclass(frozen=True)
class ErasureTarget:
    establishment_id: str
    patient_ref: str
    person_id: str
    patient_refs: tuple[str, ...]      # the person's patient references at every establishment (bronze, in clear)
    patient_keys: tuple[str, ...]      # their keyed patient keys (staged, validated, silver)


def erasure_target(spark, ctx, truth: Path, attempts: int = 200) -> ErasureTarget:
    """A person present in silver: the reference an erasure request names, and every id of theirs in the lake."""
    from pyspark.sql import functions as F

    from jobs.privacy.erasure import patient_key_of

    patients = spark.read.format("delta").load(ctx.lake.silver("patient"))
    with truth.open(encoding="utf-8") as handle:
        for _, line in zip(range(attempts), handle):
            sites = json.loads(line)["establishments"]
            for site in sites:
                key = patient_key_of(ctx.key, site["establishment"], site["patient_ref"])
                found = (patients.where((F.col("establishment_id") == site["establishment"])
                                        & (F.col("patient_key") == key) & F.col("person_id").isNotNull())
                         .select("person_id").first())
                if found is not None:
                    keys = [r.patient_key for r in patients.where(F.col("person_id") == found.person_id)
                            .select("patient_key").distinct().collect()]
                    return ErasureTarget(site["establishment"], site["patient_ref"], found.person_id,
                                         tuple(sorted({s["patient_ref"] for s in sites})),
                                         tuple(sorted(set(keys) | {key})))
    raise RuntimeError(f"none of the first {attempts} persons of {truth} is in silver; is silver empty?")


# The columns that name a person, by the zone's own identifier, in the order a table is clustered by.
PERSON_COLUMNS = ("person_id", "patient_key", "patient_ref")


def person_tables(spark, lake) -> dict[str, tuple[str, str]]:
    """Every table of the lake holding persons, ``name -> (zone, path)``: what an erasure walks.

    The zones are :data:`jobs.core.lake.ZONES` that hold persons (landing is files,
    ops is only read by erasure; gold holds no person and is recomputed from
    silver by the erasure itself), and of each zone the tables with a person
    column.
    """
    from jobs.core.lake import GOLD, LANDING, OPS, ZONES
    from jobs.stages.maintenance import zone_tables

    found = {}
    for zone in ZONES.values():
        if zone.name in (LANDING, OPS, GOLD):
            continue
        for name, path in zone_tables(spark, lake, zone.name).items():
            columns = spark.read.format("delta").load(path).columns
            if any(c in columns for c in PERSON_COLUMNS):
                found[name] = (zone.name, path)
    return found


def _local(path: str) -> Path:
    return Path(path.removeprefix("file:"))


def _create_like(spark, source: str, target: str, schema) -> None:
    """An empty table at ``target`` with the schema, partitioning, properties and comment of ``source``."""
    from delta.tables import DeltaTable

    detail = DeltaTable.forPath(spark, source).detail().first()
    builder = DeltaTable.create(spark).location(target)
    if detail.description:
        builder = builder.comment(detail.description)
    for f in schema.fields:
        builder = builder.addColumn(f.name, f.dataType, nullable=f.nullable, comment=f.metadata.get("comment"))
    if detail.partitionColumns:
        builder = builder.partitionedBy(*detail.partitionColumns)
    for name, value in (detail.properties or {}).items():
        builder = builder.property(name, value)
    builder.execute()


def build_erasure_lake(spark, ctx, root: Path, factor: float, clustered: bool, target: ErasureTarget) -> dict:
    """A copy of the benchmark's lake (after publish) with every person-holding table at ``factor`` × its persons.

    The lake folder is copied whole (ops, gold, reports, every table), then each
    table that holds persons — bronze, staged, validated, silver, quarantine,
    the project extracts — is recreated empty with the source table's schema,
    partitioning and properties (silver through ``jobs.stages.land.ensure_silver_table``,
    as land creates it: deletion vectors, Change Data Feed, key fingerprint) and
    filled in one append:

    - ``factor`` ≥ 1: the table's rows plus ``factor - 1`` copies whose person
      columns (``person_id``, ``patient_key``, ``patient_ref``) are renamed
      per copy (SHA-256 of the id and the copy's number, the same in every
      table), so each copy is other persons;
    - ``factor`` < 1: that share of the table's persons (by a hash of its own
      person column), always keeping the person to erase.

    ``clustered`` writes each table range-partitioned and sorted by its person
    column, so each file holds a narrow range of persons and Delta's min/max
    statistics can skip the others. Either way the copies start without the
    landed tables' history or pending deletion vectors.
    """
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from jobs.privacy.erasure import _hex_hmac
    from jobs.stages.land import ensure_silver_table
    from jobs.core.lake import PROJECTS, SILVER, Lake

    source_root = _local(ctx.lake.root)
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(source_root, root)
    lake = Lake(str(root))
    copies = max(1, round(factor))
    rows: dict[str, int] = {}
    files = 0
    silver_properties_match = True
    for name, (zone, path) in person_tables(spark, ctx.lake).items():
        destination = str(root / _local(path).relative_to(source_root))
        table = spark.read.format("delta").load(path)
        ids = [c for c in PERSON_COLUMNS if c in table.columns]
        if factor < 1:
            keep = int(round(1 / factor))
            wanted = {"person_id": [target.person_id], "patient_key": list(target.patient_keys),
                      "patient_ref": list(target.patient_refs)}
            if zone == PROJECTS:  # extracts hold the person_id keyed again per project
                wanted["person_id"] = [_hex_hmac(ctx.key.project_key(name.split(".")[1]), target.person_id)]
            table = table.where((F.abs(F.hash(ids[0])) % keep == 0) | F.col(ids[0]).isin(wanted[ids[0]]))
        parts = [table]
        for copy in range(1, copies):
            renamed = table
            for column in ids:
                # A new id that does not contain the original: the erasure's proof looks for the person's ids
                # inside every value, so an id with a suffix would still name the person erased.
                renamed = renamed.withColumn(column, F.sha2(F.concat(F.col(column), F.lit(f"~{copy}")), 256))
            parts.append(renamed)
        frame = parts[0]
        for part in parts[1:]:
            frame = frame.unionByName(part)
        if clustered:
            n_files = max(1, spark.sparkContext.defaultParallelism * copies)
            frame = frame.repartitionByRange(n_files, ids[0]).sortWithinPartitions(ids[0])
        shutil.rmtree(_local(destination))
        if zone == SILVER:
            ensure_silver_table(spark, lake, name.split(".", 1)[1], ctx.key.fingerprint)
            silver_properties_match &= (DeltaTable.forPath(spark, destination).detail().first().properties
                                        == DeltaTable.forPath(spark, path).detail().first().properties)
        else:
            _create_like(spark, path, destination, table.schema)
        frame.write.format("delta").mode("append").save(destination)
        written = DeltaTable.forPath(spark, destination)
        rows[name] = int(written.history(1).select("operationMetrics").first()[0].get("numOutputRows", 0))
        files += int(written.detail().select("numFiles").first()[0] or 0)
    by_zone: dict[str, int] = {}
    for name, n in rows.items():
        by_zone[name.split(".")[0]] = by_zone.get(name.split(".")[0], 0) + n
    return {"rows": sum(rows.values()), "silver_rows": by_zone.get(SILVER, 0), "rows_by_zone": by_zone,
            "files": files, "tables": len(rows), "silver_properties_match": silver_properties_match}


def erasure_metrics(spark, root: Path, rows_removed: dict[str, int]) -> dict[str, int]:
    """Files of every silver table of an erasure lake after the erasure, and the rows it removed.

    The rows come from the erasure's own outcome: erasure forgets each touched
    table's log history (the MERGE commit's metrics with it), so that no old
    commit keeps the person's ids.
    """
    from delta.tables import DeltaTable

    from jobs.core.lake import Lake
    from jobs.core.schemas import DATASETS

    lake = Lake(str(root))
    # A dataset no establishment of the consortium delivers (observation, here) has no silver table.
    present = [lake.silver(d) for d in DATASETS if DeltaTable.isDeltaTable(spark, lake.silver(d))]
    files = sum(int(DeltaTable.forPath(spark, path).detail().select("numFiles").first()[0] or 0) for path in present)
    deleted = sum(n for table, n in rows_removed.items() if table.startswith("silver."))
    return {"files_in_tables": files, "rows_deleted": deleted, "rows_deleted_all_zones": sum(rows_removed.values())}


# ------------------------------------------------------------ the run ----

def setup_environment(work: Path, size: Size) -> dict[str, str]:
    """Airflow home, lake, landing and a throwaway key for synthetic data, as the demo sets them."""
    from jobs.app.demo import airflow_env

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
    from jobs.core import spark_service

    # What an interrupted run left: its Spark service (holding that run's key) and Airflow's metadata
    # database, whose DAG runs of the same batch would refuse this run's trigger.
    spark_service.stop(work / "spark-service")
    for scratch in ("lake", "bare", "erasure", "eventlog", "scratch", "airflow", "spark-service"):
        shutil.rmtree(work / scratch, ignore_errors=True)
    (work / "eventlog").mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / f"{size_name}.json"

    from jobs.stages import pipeline
    from jobs.core.session import get_spark
    from jobs.core.settings import Settings

    ctx = pipeline.Context.from_env()
    results: dict = {
        "size": size_name, "method": METHOD, "complete": False, "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code": code_version(PROJECT_ROOT),
        "parameters": {"patients": size.patients, "batches": size.batches, "seed": SEED, "defect_rate": DEFECT_RATE},
        "environment": {"cpus": os.cpu_count(), "memory_gb": round(__import__("psutil").virtual_memory().total / 2**30, 1),
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                        "driver_memory": os.environ["AFFLUENT_DRIVER_MEMORY"],
                        "shuffle_partitions": os.environ.get("AFFLUENT_SHUFFLE_PARTITIONS", "8"),
                        "python": platform.python_version()},
        "stages": {}, "ratios": {}, "delta_commits_per_batch": {}, "profile": {},
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
    # Every zone is a folder of the one lake root: its Delta logs are where a batch's commits show.
    lake_root = None if "://" in settings.lake_root else Path(settings.lake_root)
    establishments = measured_establishments(ctx.consortium, size)

    def count_commits(batch: str, prefix: str, stages: tuple[str, ...]) -> None:
        made = results["delta_commits_per_batch"][batch] = {
            "batch_id": {"full": batch_full, "incremental": batch_incremental, "dag": batch_dag}[batch],
            "establishments": len(establishments), **rec.commits(prefix, stages)}
        say(f"Delta commits per batch ({batch}, {len(establishments)} establishment(s)): {made['total']} — "
            + ", ".join(f"{s} {n}" for s, n in made["per_stage"].items()), clock)

    with MemorySampler() as memory:
        rec = Recorder(spark, memory, clock, lake=lake_root)

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
        staged_versions: dict[str, dict[str, int]] = {}
        for est in measured_establishments(ctx.consortium, size):
            for stage in STAGES:
                with rec.step(f"full.{stage}") as box:
                    box["rows"] = stage_rows(stage, getattr(pipeline, stage)(ctx, est, batch_full))
                if stage == Stage.VALIDATE:  # land removes the batch from staged/: ratio 2 reads it as validate did
                    staged_versions[est] = staged_table_versions(ctx)
        pipeline_seconds = rec.seconds(*(f"full.{s}" for s in STAGES))
        results["ratios"]["pipeline_overhead"] = {
            "pipeline_seconds": round(pipeline_seconds, 2), "bare_copy_seconds": round(rec.seconds("bare_copy"), 2),
            "rows_read": rec.rows("full.ingest"), "bare_rows": rec.rows("bare_copy"),
            "ratio": ratio(pipeline_seconds, rec.seconds("bare_copy"))}
        count_commits("full", "full", STAGES)
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
        count_commits("incremental", "incremental", STAGES)
        results["stages"] = rec.table()
        save()

        # 3. Orchestration: the third batch through every measured establishment's DAG, tasks as service clients.
        results["ratios"]["orchestration"] = orchestrate(env, ctx, rec, batch_dag,
                                                         measured_establishments(ctx.consortium, size), clock, work)
        count_commits("dag", "dag_task", DAG_TASKS)
        results["stages"] = rec.table()
        save()

        # 4. Publish, then the researcher query on both engines.
        with rec.step("publish") as box:
            box["rows"] = stage_rows("publish", pipeline.publish_all(ctx))
        results["ratios"]["researcher_query"] = researcher_queries(ctx, rec, size.repeats)
        results["stages"] = rec.table()
        save()

        # 5. Validation engines on the full batch's staged rows.
        results["ratios"]["validation"] = validation_engines(spark, ctx, rec, batch_full, staged_versions)
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


def _reopen(size_name: str, out: Path, work: Path) -> tuple[Size, Path, dict, Clock, Path]:
    """A size's existing results to re-measure a ratio into, and its environment set up as its run set it."""
    size = SIZES[size_name]
    result_path = out / f"{size_name}.json"
    results = json.loads(result_path.read_text(encoding="utf-8"))
    work = work.resolve()
    setup_environment(work, size)
    return size, result_path, results, Clock(), work


def remeasure_validation(size_name: str, out: Path, doc: Path | None, plot: bool, work: Path) -> dict:
    """Ratio 2 alone, merged into an existing ``<size>.json``: a fresh lake, the full batch's ingest,
    pseudonymise and validate, then both engines on its staged rows.

    The result's ``validation`` ratio and ``validation_engines.*`` steps are
    replaced and ``remeasured.validation`` says when, at which commit and why;
    every other figure stays the complete run's.
    """
    size, result_path, results, clock, work = _reopen(size_name, out, work)
    shutil.rmtree(work / "lake", ignore_errors=True)

    from jobs.stages import pipeline
    from jobs.core.session import get_spark
    from jobs.core.settings import Settings

    ctx = pipeline.Context.from_env()
    generation = ensure_consortium(work, size, ctx.consortium, clock)
    batch_full = generation["batch_ids"][0]
    spark = get_spark(Settings.from_env(), app_name="affluent-bench-validation")
    staged_versions: dict[str, dict[str, int]] = {}
    with MemorySampler() as memory:
        rec = Recorder(spark, memory, clock)
        for est in measured_establishments(ctx.consortium, size):
            for stage in (Stage.INGEST, Stage.PSEUDONYMISE, Stage.VALIDATE):
                with rec.step(f"full.{stage}") as box:
                    box["rows"] = stage_rows(stage, getattr(pipeline, stage)(ctx, est, batch_full))
            staged_versions[est] = staged_table_versions(ctx)
        validation = validation_engines(spark, ctx, rec, batch_full, staged_versions)
    spark.stop()
    steps = {name: step for name, step in rec.table().items() if name.startswith("validation_engines.")}
    return _merge_remeasured(results, result_path, "validation", validation, ("validation_engines.",), steps,
                             "the complete run read staged/ after land had removed the batch: both engines checked "
                             "no rows", out, doc, plot, clock)


def remeasure_erasure(size_name: str, out: Path, doc: Path | None, plot: bool, work: Path) -> dict:
    """Ratio 4 alone, merged into an existing ``<size>.json``: the erasure phase on copies of the lake the
    size's last run left (landed and published), as that run would have measured it.

    The result's ``erasure`` ratio and ``erasure_setup.*``/``erasure.*`` steps
    are replaced and ``remeasured.erasure`` says when, at which commit and why;
    every other figure stays the run's. A run that stopped in its erasure phase
    (its last) is then complete: its Spark jobs are profiled from its event log.
    """
    size, result_path, results, clock, work = _reopen(size_name, out, work)
    if not (work / "lake" / "silver").is_dir():
        raise SystemExit(f"no landed lake in {work / 'lake'}: run --size {size_name} first")

    from jobs.stages import pipeline
    from jobs.core.session import get_spark
    from jobs.core.settings import Settings

    if not results.get("profile"):
        results["profile"] = spark_jobs_by_group(work / "eventlog")
    ctx = pipeline.Context.from_env()
    spark = get_spark(Settings.from_env(), app_name="affluent-bench-erasure")
    with MemorySampler() as memory:
        rec = Recorder(spark, memory, clock)
        measured = erasure(spark, ctx, rec, work, size, clock)
    spark.stop()
    results["complete"] = True
    return _merge_remeasured(results, result_path, "erasure", measured, ("erasure_setup.", "erasure."), rec.table(),
                             "the run stopped in its erasure phase: the 10×N copies renamed each person by a suffix, "
                             "an id that still contains the erased person's, which the erasure's content proof "
                             "rightly refused", out, doc, plot, clock)


def _merge_remeasured(results: dict, result_path: Path, name: str, measured: dict, prefixes: tuple[str, ...],
                      steps: dict, why: str, out: Path, doc: Path | None, plot: bool, clock: Clock) -> dict:
    """``measured`` as the ratio ``name`` of ``results`` and ``steps`` instead of its steps (those named with
    ``prefixes``), with when, at which commit and why in ``remeasured``; written, then the docs rebuilt."""
    code = code_version(PROJECT_ROOT)
    results["ratios"][name] = measured
    kept = {step: figures for step, figures in results["stages"].items() if not step.startswith(prefixes)}
    results["stages"] = kept | steps
    results.setdefault("remeasured", {})[name] = {
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": code["short"],
        "dirty": code["dirty"], "why": why}
    result_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    say(f"the {name} ratio re-measured into {result_path}", clock)
    if doc is not None or plot:
        from benchmarks.report import render

        render(out, doc, plot)
    return results


DAG_TASKS = ("select_batch", *STAGES)


def _run_sampled(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, dict[str, int], int]:
    """Run ``cmd`` to its end; its wall seconds, its tree's peak resident memory (MB) and its return code."""
    import psutil

    peak = {"python_mb": 0, "jvm_mb": 0, "total_mb": 0}
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
        while True:
            try:
                process.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            try:
                root = psutil.Process(process.pid)
                tree = [root, *root.children(recursive=True)]
                jvm = sum(p.memory_info().rss for p in tree if p.name().startswith("java"))
                python = sum(p.memory_info().rss for p in tree if not p.name().startswith("java"))
            except psutil.Error:
                continue
            peak = {"python_mb": max(peak["python_mb"], python >> 20), "jvm_mb": max(peak["jvm_mb"], jvm >> 20),
                    "total_mb": max(peak["total_mb"], (python + jvm) >> 20)}
        wall = time.perf_counter() - started
    return wall, peak, process.returncode


def orchestrate(env: dict[str, str], ctx, rec: Recorder, batch_id: str, establishments: list[str],
                clock: Clock, work: Path) -> dict:
    """Every measured establishment's ingest DAG on one batch, one process per task, in DAG order.

    Each task runs in a fresh process (``python -m benchmarks.airflow_task``:
    Airflow's own ``airflow tasks test`` CLI with the stage functions timed
    inside), as the LocalExecutor runs each task in a process of its own: the
    interpreter, Airflow and the DAG file start for every task, the task reads
    its upstream XCom from the metadata database, and it runs its Spark work as
    a thin client of one Spark service, as ``affluent airflow`` runs it (the
    connection ``affluent_spark``, no key in the task's environment). The
    service is started and warmed before the first task, outside the timed
    span (a deployment's service outlives its DAG runs). The run is created
    first with ``airflow dags trigger`` (its DAG stays paused, so no scheduler
    picks it up). Wall time is the sum of the task processes' wall times; the
    ratio compares it with the same four stages run on the previous
    (incremental) batch in this process's warm session.
    """
    from jobs.app.spark_client import airflow_client_env
    from jobs.core import spark_service

    airflow = str(Path(sys.executable).parent / "airflow")
    logs = Path(env["AIRFLOW_HOME"]) / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    migrate_seconds = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([airflow, "dags", "reserialize"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    reserialize_seconds = time.perf_counter() - started

    service_folder = work / "spark-service"
    started = time.perf_counter()
    state = spark_service.start(service_folder, port=_free_port(), key_source=env)
    service_start_seconds = time.perf_counter() - started
    client_env = airflow_client_env(env, state)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", SERVICE_WARM_UP, str(work / "scratch" / "service_warm_up")],
                   env=client_env, cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL)
    service_warm_up_seconds = time.perf_counter() - started
    say(f"Spark service up in {service_start_seconds:.1f} s, warmed in {service_warm_up_seconds:.1f} s", clock)

    walls: dict[str, float] = {}
    tasks: dict[str, dict[str, dict]] = {}
    trigger_seconds: dict[str, float] = {}
    conf = json.dumps({"batch_id": batch_id})
    try:
        for est in establishments:
            dag_id = f"affluent_ingest_{est}"
            run_id = f"bench__{batch_id}"
            log = logs / f"{dag_id}.log"
            seconds, _, code = _run_sampled([airflow, "dags", "trigger", dag_id, "--run-id", run_id, "--conf", conf],
                                            env, log)
            if code:
                raise RuntimeError(f"airflow dags trigger {dag_id} failed ({code}); see {log}")
            trigger_seconds[est] = round(seconds, 2)
            tasks[est] = {}
            for task_id in DAG_TASKS:
                record = logs / f"{dag_id}.{task_id}.json"
                task_env = dict(client_env, AFFLUENT_BENCH_TASK_RECORD=str(record))
                before = rec.versions()
                wall, peak, code = _run_sampled(
                    [sys.executable, "-m", "benchmarks.airflow_task", dag_id, task_id, run_id, "-t", conf],
                    task_env, log)
                if code:
                    raise RuntimeError(f"{dag_id}.{task_id} on batch {batch_id} failed ({code}); see {log}")
                commits = delta_commits(before, rec.versions()) if rec.lake is not None else None
                entry = {"wall_seconds": round(wall, 2), "peak_memory": peak}
                if commits is not None:
                    entry["delta_commits"] = sum(commits.values())
                if task_id in STAGES:
                    done = json.loads(record.read_text(encoding="utf-8"))
                    if done["summary"].get("skipped"):
                        raise RuntimeError(f"{dag_id}.{task_id} skipped batch {batch_id}: {done['summary']}")
                    rows = stage_rows(task_id, done["summary"])
                    rec.add(f"dag.{task_id}", rows, done["stage_seconds"], peak, commits)
                    entry |= {"spark_start_seconds": round(done["spark_start_seconds"], 2),
                              "stage_seconds": round(done["stage_seconds"], 2), "rows": rows}
                rec.add(f"dag_task.{task_id}", entry.get("rows", 0), wall, peak, commits)
                tasks[est][task_id] = entry
            walls[est] = sum(t["wall_seconds"] for t in tasks[est].values())
            say(f"{dag_id}: batch {batch_id} in {walls[est]:.1f} s over {len(DAG_TASKS)} task processes "
                f"(stages {sum(t.get('stage_seconds', 0) for t in tasks[est].values()):.1f} s)", clock)
    finally:
        spark_service.stop(service_folder)
    stage_seconds = rec.seconds(*(f"dag.{s}" for s in STAGES))
    warm_seconds = rec.seconds(*(f"incremental.{s}" for s in STAGES))
    spark_start = sum(t.get("spark_start_seconds", 0) for per in tasks.values() for t in per.values())
    dag_seconds = sum(walls.values())
    return {"method": "airflow tasks test, one process per task, each a client of one warm Spark service",
            "dag_wall_seconds": round(dag_seconds, 2), "warm_session_stage_seconds": round(warm_seconds, 2),
            "warm_session_batch": "incremental",
            "stage_seconds": round(stage_seconds, 2), "spark_start_seconds": round(spark_start, 2),
            "process_overhead_seconds": round(dag_seconds - stage_seconds - spark_start, 2),
            "service_start_seconds": round(service_start_seconds, 1),
            "service_warm_up_seconds": round(service_warm_up_seconds, 1),
            "per_dag_seconds": {e: round(s, 2) for e, s in walls.items()}, "tasks": tasks,
            "trigger_seconds": trigger_seconds, "airflow_db_migrate_seconds": round(migrate_seconds, 1),
            "airflow_dags_reserialize_seconds": round(reserialize_seconds, 1),
            "ratio_over_stage_functions": ratio(dag_seconds, stage_seconds),
            "ratio": ratio(dag_seconds, warm_seconds)}


# The warm session's own warm-up, run once through the service as a client before the DAG tasks.
SERVICE_WARM_UP = """
import sys
from jobs.core.session import get_spark
spark = get_spark()
spark.range(200_000).selectExpr("id", "sha2(cast(id as string), 256) AS h").write.format("delta").save(sys.argv[1])
spark.stop()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def researcher_queries(ctx, rec: Recorder, repeats: int) -> dict:
    """Each query on DuckDB/delta-rs and on Spark SQL: one warm-up of each, then ``repeats`` alternating runs.

    An engine measurement, not the researcher path: researchers reach DuckDB
    only through the gateway (with output checking and audit), never Spark.
    Here the same checked SQL runs on the gateway's locked-down DuckDB and, for
    comparison, on Spark temporary views of the extracts. Each engine runs the
    query exactly once per repetition; the timer wraps that call alone (the
    engine's set-up for the query included: DuckDB's connection and extract
    registration, Spark's views), not the recorder's own bookkeeping.
    """
    project = ctx.consortium.projects[RESEARCHER[0]]
    engines = {"duckdb": _duckdb_rows, "spark": _spark_rows}
    out: dict[str, dict] = {}
    for name, sql in QUERIES.items():
        timings: dict[str, list[float]] = {engine: [] for engine in engines}
        rows: dict[str, int] = {}
        for engine, run_query in engines.items():  # the same warm-up for both, untimed
            rows[engine] = run_query(ctx, project, sql)
        for _ in range(repeats):
            for engine, run_query in engines.items():
                with rec.step(f"query.{name}.{engine}") as box:
                    started = time.perf_counter()
                    # Aggregated result (a few dozen rows at most): fetching it is what a researcher waits for.
                    rows[engine] = box["rows"] = run_query(ctx, project, sql)
                    timings[engine].append(time.perf_counter() - started)
        duck, spark_s = statistics.median(timings["duckdb"]), statistics.median(timings["spark"])
        out[name] = {"duckdb_seconds": round(duck, 3), "spark_seconds": round(spark_s, 3), "rows": rows,
                     "runs": repeats, "ratio_spark_over_duckdb": ratio(spark_s, duck)}
    out["ratio"] = out["join_distinct"]["ratio_spark_over_duckdb"]
    return out


def _duckdb_rows(ctx, project, sql: str) -> int:
    from jobs.research import access

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


def staged_table_versions(ctx) -> dict[str, int]:
    """The current version of each staged table (delta-rs: no Spark job, nothing added to a timed step)."""
    from jobs.core.arrow_tables import open_delta
    from jobs.core.schemas import DATASETS

    tables = {dataset: open_delta(ctx.lake.staged(dataset)) for dataset in DATASETS}
    return {dataset: table.version() for dataset, table in tables.items() if table is not None}


def validation_engines(spark, ctx, rec: Recorder, batch_id: str, staged_versions: dict[str, dict[str, int]]) -> dict:
    """GX versus the generated Spark expressions on each dataset's staged rows of the full batch.

    Land removes a batch from ``staged/`` once it has landed, so each
    establishment's rows are read at the version its validate read
    (``staged_versions``, recorded right after that stage). An empty frame is
    refused: timing checks on no rows would measure nothing.
    """
    from functools import reduce

    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    from jobs.core.schemas import DATASETS
    from jobs.stages.validate import measure_engines

    per_dataset: dict[str, dict] = {}
    for dataset in DATASETS:
        path = ctx.lake.staged(dataset)
        parts = [spark.read.format("delta").option("versionAsOf", versions[dataset]).load(path)
                 .where((F.col("establishment_id") == est) & (F.col("_batch_id") == batch_id))
                 for est, versions in staged_versions.items() if dataset in versions]
        if not parts:
            continue
        staged = reduce(DataFrame.unionByName, parts)
        rows = staged.count()
        if rows == 0:
            raise RuntimeError(f"validation engines: no staged {dataset} row of batch {batch_id} to measure on")
        with rec.step(f"validation_engines.{dataset}", rows=rows):
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
    """One person erased (request + process) from copies of the whole lake at two sizes and two layouts."""
    from jobs.privacy.erasure import process_erasures, request_erasure
    from jobs.core.lake import Lake

    target = erasure_target(spark, ctx, work / "consortium" / "ground_truth" / "persons.jsonl")
    out: dict[str, dict] = {}
    for layout, clustered in (("as_landed", False), ("clustered_by_person", True)):
        for factor in size.erasure_factors:
            label = f"{layout}.x{factor:g}"
            root = work / "erasure" / label
            with rec.step(f"erasure_setup.{label}") as box:
                built = build_erasure_lake(spark, ctx, root, factor, clustered, target)
                box["rows"] = built["rows"]
            lake = Lake(str(root))
            with rec.step(f"erasure.{label}", rows=built["rows"]):
                request_erasure(spark, lake, ctx.key, target.establishment_id, target.patient_ref)
                outcome = process_erasures(spark, lake, ctx.consortium, ctx.key)
            if not outcome.processed:
                raise RuntimeError(f"erasure on {root} did not resolve the person: {outcome}")
            out[label] = {**built, "seconds": round(rec.steps[f"erasure.{label}"]["seconds"], 2),
                          "tables_vacuumed": len(outcome.vacuumed),
                          **erasure_metrics(spark, root, outcome.rows_removed)}
            shutil.rmtree(root, ignore_errors=True)
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
    parser.add_argument("--only", choices=["validation", "erasure"], default=None,
                        help="re-measure one ratio into the size's existing results (validation: ratio 2, "
                             "erasure: ratio 4 on the lake the size's last run left)")
    args = parser.parse_args(argv)
    measure = {"validation": remeasure_validation, "erasure": remeasure_erasure}.get(args.only or "", run)
    measure(args.size, args.out.resolve(), None if args.no_doc else args.doc, not args.no_plot,
            args.work or BENCH_ROOT / args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
