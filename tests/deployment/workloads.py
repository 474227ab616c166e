"""What deployment tests run inside a separate Spark application: ``fn(ctx) -> dict``."""

from __future__ import annotations

from pyspark.sql import functions as F

from jobs.pipeline import Context


def delta_write_read_merge(ctx: Context) -> dict:
    """Write a Delta table under the lake root, read it back, MERGE into it and report what happened."""
    from delta.tables import DeltaTable

    spark = ctx.spark
    path = ctx.lake.root.rstrip("/") + "/silver/deployment_check"
    first = spark.range(0, 10).select(F.col("id").cast("int").alias("id"), F.lit("first").alias("origin"))
    first.write.format("delta").mode("overwrite").save(path)
    written = spark.read.format("delta").load(path).count()

    changes = spark.range(5, 15).select(F.col("id").cast("int").alias("id"), F.lit("merged").alias("origin"))
    (DeltaTable.forPath(spark, path).alias("t")
     .merge(changes.alias("c"), "t.id = c.id")
     .whenMatchedUpdateAll()
     .whenNotMatchedInsertAll()
     .execute())

    after = {r["origin"]: r["n"] for r in
             spark.read.format("delta").load(path).groupBy("origin").agg(F.count("*").alias("n")).collect()}
    history = [r["operation"] for r in
               DeltaTable.forPath(spark, path).history().orderBy("version").select("operation").collect()]
    executors = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus the driver
    return {"table": path, "rows_written": written, "rows_after_merge": after, "history": history,
            "executors": executors}


def one_batch_end_to_end(ctx: Context) -> dict:
    """Generate a tiny consortium into the lake's landing zone and run one CSV batch through all four stages."""
    from pathlib import Path

    from jobs import pipeline
    from jobs.generate import generate_consortium
    from jobs.land import reconcile

    establishment = "chu_laurentides"
    summary = generate_consortium(Path(ctx.lake.root), ctx.consortium, patients=25, batches=1, seed=3,
                                  defect_rate=0.05)
    batch_id = summary.batch_ids[0]
    ran = pipeline.run_batch(ctx, establishment, batch_id)
    spark = ctx.spark
    silver = {dataset: spark.read.format("delta").load(ctx.lake.silver(dataset)).count()
              for dataset in ("patient", "encounter")}
    checks = [r.asDict() for r in reconcile(spark, ctx.lake, establishment).collect()]
    executors = spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1
    return {"batch_id": batch_id, "stages": sorted(ran) if isinstance(ran, dict) else str(ran),
            "silver_rows": silver, "reconciliation": checks, "executors": executors,
            "rows_delivered": summary.rows[establishment][batch_id]}


def batch_then_delta_checks(ctx: Context) -> dict:
    """Both checks in one application (one driver and executor start-up): the batch, then the table's MERGE."""
    batch = one_batch_end_to_end(ctx)
    return {"batch": batch, "delta": delta_write_read_merge(ctx), "executors": batch["executors"]}
