"""Ingest DAGs: one per establishment declared under ``config/establishments/``.

Adding an establishment's YAML file adds its DAG; no code changes.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from jobs.core.batchlog import QueueState, Stage, Status
from jobs.core.registry import LAKE_WRITERS_POOL, establishments, retry_args, silver_assets, task_context

log = logging.getLogger(__name__)

DEFAULT_ARGS = {
    "owner": "data-engineering",
    **retry_args(),  # AFFLUENT_TASK_RETRIES, AFFLUENT_TASK_RETRY_DELAY_SECONDS
    "execution_timeout": timedelta(hours=2),
}

DOC = """
### Ingest {name} (`{id}`)

Takes the next batch of `landing/{id}/` in delivery order (or the batch named
in the run's `batch_id` parameter) through the four stages of the flow. A batch
rejected or stopped at any stage blocks the later ones: `select_batch` fails
with the reason until a steward fixes it (`affluent batch retry {id} BATCH`) or
sets it aside (`affluent batch skip {id} BATCH --reason …`); `affluent batches`
shows why a queue is blocked.

1. **ingest** — checks the manifest (files, sha256, row counts), parses every
   file with the establishment's profile into bronze; malformed lines and
   bytes invalid in the declared encoding go to quarantine.
2. **pseudonymise** — keyed pseudonyms, generalised quasi-identifiers, exact
   duplicates dropped and counted. Needs the pseudonymisation key.
3. **validate** — Great Expectations suites; failing rows to quarantine,
   batch-level rules stop the batch before anything lands.
4. **land** — MERGE into silver; checks `read = landed + quarantined + duplicates`.
   Runs in the `affluent_lake_writers` pool (one slot), so no MERGE overlaps a
   publish, an erasure or a VACUUM.

Every stage is idempotent: re-running a run for a batch already done changes
no table. A failure names the establishment, the batch and the rule; see
`affluent batches --establishment {id}` and the validation report.
"""

RERUN = ("\n\n**Re-run**: clear this task (or run `affluent {stage} --establishment <id> --batch <batch>`); "
         "the stage is idempotent, a batch already done changes nothing.")
# Task names: the four stages and the task that picks the batch.
SELECT_BATCH = "select_batch"
TASK_DOCS = {
    SELECT_BATCH: "Chooses the batch: the run's `batch_id` parameter, or the oldest pending batch of the "
        "establishment's queue, read from `ops/batch_log` with delta-rs (no Spark). Skips when nothing is "
        "pending; fails, naming the batch and the reason, when a stopped batch blocks the queue "
        "(`affluent batch retry|skip`).",
    Stage.INGEST: "**Reads** `landing/<establishment>/<batch>/` (manifest, files). **Writes** `bronze/<dataset>` "
        "(parsed, still identifying) and `quarantine/rows` (malformed lines, encoding errors). Logs one line "
        "per dataset: rows parsed and quarantined." + RERUN.format(stage=Stage.INGEST),
    Stage.PSEUDONYMISE: "**Reads** `bronze/<dataset>` for the batch and the key. **Writes** `staged/<dataset>`: "
        "person_id and record ids keyed, quasi-identifiers generalised, free text dropped, exact "
        "duplicates counted." + RERUN.format(stage=Stage.PSEUDONYMISE),
    Stage.VALIDATE: "**Reads** `staged/<dataset>`. **Writes** `validated/<dataset>`, failing rows to `quarantine/rows`, "
        "results to `ops/validation_results` and an HTML report (its path is logged). A batch-level rule "
        "broken stops the batch here." + RERUN.format(stage=Stage.VALIDATE),
    Stage.LAND: "**Reads** `validated/<dataset>`. **Writes** `silver/<dataset>` (MERGE) and `ops/batch_log`; checks "
        "read = landed + quarantined + duplicates; emits the silver Assets that trigger publish. Runs in the "
        "one-slot `affluent_lake_writers` pool." + RERUN.format(stage=Stage.LAND),
}


def _run_stage(stage: Stage, establishment_id: str, batch_id: str) -> dict:
    """One stage of one batch; failures no retry can fix fail the task at once, naming what to fix."""
    from jobs.stages import pipeline
    from jobs.stages.onboarding import BatchHeld
    from jobs.core.stage_log import log_figures

    try:
        summary = getattr(pipeline, stage.value)(task_context(), establishment_id, batch_id)
        log_figures(stage.value, establishment_id, batch_id, summary)  # one INFO line per dataset
        return summary
    except BatchHeld as exc:  # onboarding: validated and reported, waiting for a steward's acceptance
        raise AirflowSkipException(str(exc)) from exc
    except pipeline.permanent_failures() as exc:
        raise AirflowFailException(f"{stage} of {establishment_id}/{batch_id} stopped: {exc}") from exc


def _warn_about_safety_dags(context) -> None:
    """Say loudly, at the start of every run, what keeps this batch from reaching the extracts or erasure."""
    from jobs.privacy import safety

    try:
        ctx = task_context()
        paused, unknown = safety.paused_from_task(context["ti"])
        for message in safety.paused_warnings(paused, ctx.lake, ctx.consortium.projects):
            log.warning(message)
        for dag_id in unknown:
            log.warning("could not read whether %s is paused; consent and erasure take effect only when it runs",
                        dag_id)
        run = context["dag_run"]
        note = safety.manual_run_note(run.run_type, run.run_after, run.start_date)
        if note:
            log.warning(note)
    except Exception as exc:  # noqa: BLE001 - a warning that cannot be computed must not hold a batch back
        log.warning("could not check whether publish and maintenance run (%s: %s)", type(exc).__name__, exc)


def build_ingest_dag(establishment_id: str, name: str):
    @dag(
        dag_id=f"affluent_ingest_{establishment_id}",
        dag_display_name=f"Ingest · {name}",
        schedule=timedelta(hours=1),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,  # batches are found in landing, not derived from the run date
        max_active_runs=1,  # batches of one establishment land in delivery order
        tags=["affluent", "ingest", establishment_id],
        default_args=DEFAULT_ARGS,
        params={"batch_id": Param(None, type=["null", "string"], description="Batch to process (default: oldest pending)")},
        doc_md=DOC.format(id=establishment_id, name=name),
    )
    def ingest_establishment():
        @task(doc_md=TASK_DOCS[SELECT_BATCH])
        def select_batch() -> str:
            from jobs.stages import pipeline

            context = get_current_context()
            _warn_about_safety_dags(context)
            requested = context["params"].get("batch_id")
            if requested:
                return requested  # land still refuses it until every earlier batch is landed or skipped
            queue = pipeline.queue(task_context(), establishment_id)  # the batch log via delta-rs: no Spark
            if queue.pending:
                return queue.pending[0]
            blocker = queue.blocked_by
            if blocker is not None and blocker.state == QueueState.BLOCKED and blocker.status != Status.HELD:
                raise AirflowFailException(queue.explain())  # a steward must act: no retry can help
            raise AirflowSkipException(queue.explain())

        @task(doc_md=TASK_DOCS[Stage.INGEST])
        def ingest(batch_id: str) -> dict:
            return _run_stage(Stage.INGEST, establishment_id, batch_id)

        @task(doc_md=TASK_DOCS[Stage.PSEUDONYMISE])
        def pseudonymise(batch_id: str) -> dict:
            return _run_stage(Stage.PSEUDONYMISE, establishment_id, batch_id)

        @task(doc_md=TASK_DOCS[Stage.VALIDATE])
        def validate(batch_id: str) -> dict:
            return _run_stage(Stage.VALIDATE, establishment_id, batch_id)

        @task(outlets=silver_assets(), pool=LAKE_WRITERS_POOL, doc_md=TASK_DOCS[Stage.LAND])
        def land(batch_id: str) -> dict:
            return _run_stage(Stage.LAND, establishment_id, batch_id)

        batch = select_batch()
        stages = [ingest(batch), pseudonymise(batch), validate(batch), land(batch)]
        for upstream, downstream in zip(stages, stages[1:]):
            upstream >> downstream

    return ingest_establishment()


for _est in establishments():
    globals()[f"affluent_ingest_{_est.id}"] = build_ingest_dag(_est.id, _est.name)
