"""Resolve the lake's jars (Delta, hadoop-aws and its AWS SDK) into the image's ivy cache.

Run once while building the image: a local Spark session through the project's
session factory with an ``s3a://`` lake root pulls exactly the packages a task
will ask for, so tasks start without reaching Maven Central.
"""

from jobs.core.session import get_spark
from jobs.core.settings import Settings

if __name__ == "__main__":
    settings = Settings.from_env(lake_root="s3a://prefetch-only/lake", spark_master="local[1]")
    get_spark(settings, app_name="affluent-prefetch-jars").stop()
