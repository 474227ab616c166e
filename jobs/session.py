"""The one place that builds a SparkSession with Delta Lake.

Every job receives the session as a parameter; nothing else in the project
calls ``SparkSession.builder``.
"""

from __future__ import annotations

import os
from pathlib import Path

from delta import configure_spark_with_delta_pip
from pyspark.sql import SparkSession

from jobs.settings import Settings

# Extra Maven packages for object storage; only added when the lake is on s3a://.
S3A_PACKAGES = ["org.apache.hadoop:hadoop-aws:3.5.0"]


def session_builder(settings: Settings, app_name: str = "affluent", extra_conf: dict[str, str] | None = None) -> SparkSession.Builder:
    """Return a builder configured for Delta, small machines and quiet logs.

    Example::

        spark = session_builder(Settings.from_env()).getOrCreate()
    """
    settings.jars_cache.mkdir(parents=True, exist_ok=True)
    builder = (
        SparkSession.builder.master(settings.spark_master)
        .appName(app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        # Jars are resolved once from Maven Central and cached inside the project.
        .config("spark.jars.ivy", str(settings.jars_cache))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        # Defaults that suit a 2-core machine; a cluster overrides them.
        .config("spark.sql.shuffle.partitions", os.environ.get("AFFLUENT_SHUFFLE_PARTITIONS", "8"))
        .config("spark.default.parallelism", os.environ.get("AFFLUENT_SHUFFLE_PARTITIONS", "8"))
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.databricks.delta.schema.autoMerge.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", os.environ.get("AFFLUENT_DRIVER_MEMORY", "4g"))
        .config("spark.sql.warehouse.dir", str(Path(settings.jars_cache).parent / "warehouse"))
        .config("spark.driver.extraJavaOptions", "-Dderby.system.home=/tmp")
    )
    extra_packages: list[str] = []
    if settings.lake_root.startswith("s3a://"):
        extra_packages.extend(S3A_PACKAGES)
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    return configure_spark_with_delta_pip(builder, extra_packages=extra_packages)


def get_spark(settings: Settings | None = None, app_name: str = "affluent", extra_conf: dict[str, str] | None = None) -> SparkSession:
    """Build (or reuse) the SparkSession with Delta and quiet logs."""
    settings = settings or Settings.from_env()
    spark = session_builder(settings, app_name, extra_conf).getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("AFFLUENT_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def resolve_jars(settings: Settings | None = None) -> list[str]:
    """Fetch Delta's jars (and the S3A ones) into the project's Ivy cache once, at set-up time.

    ``scripts/bootstrap`` calls this so that no pipeline task and no test
    downloads anything: the first Spark start of a fresh machine then finds
    every jar in ``.cache/ivy``. A marker records what was resolved.
    """
    settings = settings or Settings.from_env()
    s3a = Settings(lake_root="s3a://resolve-only/lake", spark_master="local[1]", config_dir=settings.config_dir,
                   jars_cache=settings.jars_cache, landing_root=settings.landing_root)
    builder = session_builder(s3a, app_name="affluent-resolve-jars")
    packages = builder._options.get("spark.jars.packages", "").split(",")  # noqa: SLF001 - what Spark will resolve
    marker = settings.jars_cache / ".resolved"
    if marker.is_file() and marker.read_text(encoding="utf-8").split() == packages:
        return packages
    builder.getOrCreate().stop()
    marker.write_text("\n".join(packages) + "\n", encoding="utf-8")
    return packages


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--resolve-jars"]:
        sys.exit("usage: python -m jobs.session --resolve-jars")
    print("==> Spark jars cached in .cache/ivy: " + ", ".join(resolve_jars()))
