"""Entry point of the Spark application that deployment tests start in a subprocess.

``python -m tests.deployment.app package.module:function`` builds the stage
context exactly as an Airflow task does (``Context.from_env`` with the master of
the ``spark_default`` connection), calls ``function(ctx)`` and prints its
JSON-able result on one line prefixed with :data:`RESULT_PREFIX`.
"""

from __future__ import annotations

import importlib
import json
import sys

RESULT_PREFIX = "AFFLUENT_APP_RESULT "


def main(target: str) -> None:
    from jobs.stages.pipeline import Context, spark_master_from_connection

    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    ctx = Context.from_env(spark_master=spark_master_from_connection("spark_default"))
    try:
        result = function(ctx)
        sc = ctx.spark.sparkContext
        result = {"master": sc.master, "application_id": sc.applicationId, **result}
    finally:
        ctx.spark.stop()
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
