"""Silver with and without deletion vectors, side by side: an incremental MERGE, an erasure, a full scan.

Usage (after ``benchmarks.run`` has left a lake behind)::

    .venv/bin/python -m benchmarks.land_layout --lake .cache/bench/100k/lake --out docs/benchmarks/land_layout-100k.json

Copies the lake's silver tables twice into a scratch folder, once as the land
stage created them before deletion vectors (every change rewrites the files it
touches) and once with deletion vectors (changed rows are only marked), then,
in one warm Spark session:

1. builds one change batch per dataset and establishment from silver itself:
   ``--share`` of its records updated (extracted a day later) and a tenth of
   that share deleted, written once so both layouts merge the same rows;
2. MERGEs it with :func:`jobs.stages.land.merge_into_silver`, the land stage's own
   code, into each layout;
3. erases one person from every table the way :mod:`jobs.privacy.erasure` does
   (DELETE, purge of deletion vectors, VACUUM);
4. counts every silver table, the price deletion vectors ask of readers.

Prints seconds, files and rows rewritten per layout and the ratios
rewrite / deletion vectors; writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.probe import code_version  # noqa: E402
from jobs.core.settings import PROJECT_ROOT  # noqa: E402

LAYOUTS = {"rewrite": False, "deletion_vectors": True}
FINGERPRINT = "benchmark"


def say(message: str) -> None:
    print(f"[land-layout] {message}", flush=True)


def merge_metrics(spark, path: str) -> dict[str, int]:
    """Sums over the table's MERGE commits (bounded: one per establishment)."""
    sums = {"files_removed": 0, "files_added": 0, "rows_copied": 0, "deletion_vectors_added": 0}
    for row in spark.sql(f"DESCRIBE HISTORY delta.`{path}`").where("operation = 'MERGE'").select(
            "operationMetrics").collect():
        m = row[0]
        sums["files_removed"] += int(m.get("numTargetFilesRemoved", 0))
        sums["files_added"] += int(m.get("numTargetFilesAdded", 0))
        sums["rows_copied"] += int(m.get("numTargetRowsCopied", 0))
        sums["deletion_vectors_added"] += int(m.get("numTargetDeletionVectorsAdded", 0))
    return sums


def run(source_root: Path, work: Path, share: float) -> dict:
    from pyspark.sql import functions as F

    from jobs.stages.land import ensure_silver_table, merge_into_silver
    from jobs.core.lake import Lake
    from jobs.stages.maintenance import vacuum_now
    from jobs.core.schemas import ACTION_DELETE, ACTION_UPSERT, DATASETS, silver_columns
    from jobs.core.session import get_spark
    from jobs.core.settings import Settings
    from jobs.core.tables import purge_deletion_vectors, table_exists

    spark = get_spark(Settings.from_env(), app_name="affluent-land-layout")
    source = Lake(str(source_root))
    datasets = [d for d in DATASETS if table_exists(spark, source.silver(d))]
    if not datasets:
        raise SystemExit(f"no silver table under {source_root}: run benchmarks.run first")
    shutil.rmtree(work, ignore_errors=True)
    lakes = {name: Lake(str(work / name)) for name in LAYOUTS}
    results: dict = {"source": str(source_root), "share": share, "code": code_version(PROJECT_ROOT),
                     "layouts": {n: {} for n in LAYOUTS}}

    say("copying silver into both layouts …")
    rows_total = 0
    for dataset in datasets:
        silver = spark.read.format("delta").load(source.silver(dataset)).select(*silver_columns(dataset))
        for name, vectors in LAYOUTS.items():
            ensure_silver_table(spark, lakes[name], dataset, FINGERPRINT, deletion_vectors=vectors)
            silver.write.format("delta").mode("append").save(lakes[name].silver(dataset))
        rows_total += spark.read.format("delta").load(lakes["rewrite"].silver(dataset)).count()
    results["silver_rows"] = rows_total

    say(f"building change batches ({share:.0%} updated, {share / 10:.1%} deleted) …")
    change_rows = 0
    establishments = sorted(r.establishment_id for r in spark.read.format("delta").load(
        source.silver(datasets[0])).select("establishment_id").distinct().collect())
    for dataset in datasets:
        silver = spark.read.format("delta").load(source.silver(dataset)).select(*silver_columns(dataset))
        picked = silver.where(F.rand(seed=7) < share)
        changes = (picked.withColumn("_extracted_at", F.col("_extracted_at") + F.expr("INTERVAL 1 DAY"))
                   .withColumn("_batch_id", F.lit("layout-bench"))
                   .withColumn("record_action", F.when(F.rand(seed=11) < 0.1, F.lit(ACTION_DELETE))
                               .otherwise(F.lit(ACTION_UPSERT))))
        changes.write.format("delta").mode("overwrite").save(str(work / "changes" / dataset))
        change_rows += spark.read.format("delta").load(str(work / "changes" / dataset)).count()
    results["change_rows"] = change_rows

    person = (spark.read.format("delta").load(source.silver("patient")).select("person_id")
              .orderBy("person_id").first().person_id)
    for name, lake in lakes.items():
        figures = results["layouts"][name]
        say(f"{name}: incremental MERGE …")
        started = time.perf_counter()
        for dataset in datasets:
            changes = spark.read.format("delta").load(str(work / "changes" / dataset))
            for est in establishments:
                merge_into_silver(spark, lake, dataset, changes.where(F.col("establishment_id") == est), est,
                                  "layout-bench")
        figures["merge_seconds"] = round(time.perf_counter() - started, 2)
        figures["merge"] = {k: sum(merge_metrics(spark, lake.silver(d))[k] for d in datasets)
                            for k in ("files_removed", "files_added", "rows_copied", "deletion_vectors_added")}

        say(f"{name}: erasing one person (DELETE, purge, VACUUM) …")
        started = time.perf_counter()
        for dataset in datasets:
            path = lake.silver(dataset)
            spark.sql(f"DELETE FROM delta.`{path}` WHERE person_id = '{person}'")
            purge_deletion_vectors(spark, path)
            vacuum_now(spark, path)
        figures["erasure_seconds"] = round(time.perf_counter() - started, 2)

        say(f"{name}: counting every table …")
        started = time.perf_counter()
        figures["rows_after"] = sum(spark.read.format("delta").load(lake.silver(d)).count() for d in datasets)
        figures["scan_seconds"] = round(time.perf_counter() - started, 2)
        say(f"{name}: {json.dumps(figures)}")

    before, after = results["layouts"]["rewrite"], results["layouts"]["deletion_vectors"]
    if before["rows_after"] != after["rows_after"]:
        raise SystemExit(f"the layouts disagree: {before['rows_after']} rows against {after['rows_after']}")
    results["ratios"] = {f"{k}_rewrite_over_deletion_vectors": round(before[f"{k}_seconds"] / after[f"{k}_seconds"], 2)
                         for k in ("merge", "erasure", "scan")}
    spark.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", type=Path, required=True, help="a lake whose silver tables are copied")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the figures")
    parser.add_argument("--share", type=float, default=0.05, help="share of silver records changed (default 0.05)")
    parser.add_argument("--work", type=Path, default=PROJECT_ROOT / ".cache" / "bench" / "land_layout")
    args = parser.parse_args(argv)
    os.environ.setdefault("AFFLUENT_SHUFFLE_PARTITIONS", "2")
    results = run(args.lake.resolve(), args.work.resolve(), args.share)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    say(f"ratios {json.dumps(results['ratios'])}; figures in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
