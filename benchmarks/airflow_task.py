"""One Airflow task run by ``airflow tasks test`` in this (fresh) process, its stage function timed inside.

Usage (what :func:`benchmarks.run.orchestrate` starts once per task, in DAG order)::

    AFFLUENT_BENCH_TASK_RECORD=/tmp/x.json python -m benchmarks.airflow_task DAG_ID TASK_ID RUN_ID [-t PARAMS]

The arguments are those of ``airflow tasks test``; the process runs Airflow's
own CLI entry point with them, so the task is parsed from the DAG file, gets
its upstream XCom from the metadata database and runs as that command runs
it. Before that, the four stage functions of :mod:`jobs.stages.pipeline` are wrapped:
the wrapper starts the task's Spark session first (timed apart, as
``spark_start_seconds``), then times the stage function alone
(``stage_seconds``), which is what the in-process benchmark steps measure.
The record is written as JSON to ``$AFFLUENT_BENCH_TASK_RECORD``. A stage task
that did not reach its stage function exits non-zero.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from jobs.core.batchlog import PIPELINE_STAGES

STAGES = tuple(stage.value for stage in PIPELINE_STAGES)
RECORD_VARIABLE = "AFFLUENT_BENCH_TASK_RECORD"


def _wrap_stages(record_path: Path) -> None:
    from jobs.stages import pipeline

    def timed(stage: str, original):
        def call(ctx, establishment_id, batch_id):
            started = time.perf_counter()
            ctx.spark  # noqa: B018 - the task's own Spark driver starts here, timed apart from the stage
            spark_start = time.perf_counter() - started
            started = time.perf_counter()
            summary = original(ctx, establishment_id, batch_id)
            stage_seconds = time.perf_counter() - started
            record_path.write_text(json.dumps({
                "stage": stage, "spark_start_seconds": spark_start, "stage_seconds": stage_seconds,
                "summary": summary}, default=str) + "\n", encoding="utf-8")
            return summary
        return call

    for stage in STAGES:
        setattr(pipeline, stage, timed(stage, getattr(pipeline, stage)))


def main(argv: list[str]) -> int:
    record_path = Path(os.environ[RECORD_VARIABLE])
    record_path.unlink(missing_ok=True)
    _wrap_stages(record_path)
    from airflow.__main__ import main as airflow_main

    sys.argv = ["airflow", "tasks", "test", *argv]
    code = 0
    try:
        airflow_main()
    except SystemExit as exc:  # the CLI may exit on its own
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    task_id = argv[1]
    if code == 0 and task_id in STAGES and not record_path.is_file():
        print(f"[bench] task {task_id} did not reach its stage function; see the log above", file=sys.stderr)
        code = 3
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
