"""What deployment tests run inside a separate Spark application: ``fn(ctx) -> dict``."""

from __future__ import annotations

import os

from pyspark.sql import functions as F

from jobs.stages.pipeline import Context


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

    from jobs.stages import pipeline
    from jobs.generate import generate_consortium
    from jobs.stages.land import reconcile

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


DENIED_BUCKET_ENV = "AFFLUENT_TEST_DENIED_BUCKET"


def delta_checks_then_a_wrong_secret(ctx: Context) -> dict:
    """:func:`delta_write_read_merge` on the lake, then a Delta write to a second bucket signed with a wrong secret.

    One application for both (one driver start-up). The second bucket's requests carry the
    right access key id with another secret (S3A's per-bucket settings); the server must
    refuse them. The refusal's message is returned, and written to stderr for the log.
    """
    import sys

    result = {"delta": delta_write_read_merge(ctx)}
    bucket = os.environ[DENIED_BUCKET_ENV]
    hadoop = ctx.spark.sparkContext._jsc.hadoopConfiguration()
    prefix = f"fs.s3a.bucket.{bucket}."
    hadoop.set(prefix + "aws.credentials.provider", "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider")
    hadoop.set(prefix + "access.key", os.environ["AWS_ACCESS_KEY_ID"])
    hadoop.set(prefix + "secret.key", "not-the-secret")
    try:
        ctx.spark.range(0, 3).write.format("delta").save(f"s3a://{bucket}/denied/silver/deployment_check")
        result["denied"] = None
    except Exception as error:  # noqa: BLE001 - the refusal is the result
        result["denied"] = str(error)
        print(result["denied"], file=sys.stderr, flush=True)
    return result
