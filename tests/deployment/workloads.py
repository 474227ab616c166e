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
