"""Daily maintenance: erasure requests, bronze retention, compaction and VACUUM."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from jobs.core.registry import LAKE_WRITERS_POOL, retry_args, silver_assets, task_context


@dag(
    dag_id="affluent_maintenance",
    dag_display_name="Maintenance · erasure, retention, compaction",
    # Unpaused from the start: erasure requests are carried out here, and a paused DAG would hold them forever.
    is_paused_upon_creation=False,
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,  # maintenance acts on the lake as it is now; past days need no replay
    max_active_runs=1,
    tags=["affluent", "maintenance"],
    # Every task deletes or rewrites lake files: one at a time with land and publish (one-slot pool).
    default_args={"owner": "data-engineering", **retry_args(), "execution_timeout": timedelta(hours=4),
                  "pool": LAKE_WRITERS_POOL},
    doc_md="""
### Maintenance

1. **erasures** — processes pending erasure requests: the person is deleted from
   silver, quarantine, gold and every project extract, then old files are vacuumed
   so time travel cannot bring them back; a receipt is written in `ops/erasure_receipts`.
2. **bronze retention** — batches older than `bronze_retention_days` are deleted
   from bronze and vacuumed (bronze still holds identifiers).
3. **transient retention** — staged and validated rows of batches landed or
   skipped, and of batches stopped before land with no batch-log entry for
   `transient_retention_days`, are deleted, their files rewritten and vacuumed,
   their history forgotten (a retry re-runs such a batch from bronze).
4. **remap** — re-derives silver's standard concept columns from the concept maps
   under `config/terminology/` (only rows whose concepts changed; no re-ingest; each
   commit's `userMetadata` names the maps). Emits the silver Assets, so publish
   rebuilds the extracts with the new concepts; skipped when no concept changed.
5. **compaction** — OPTIMIZE and VACUUM of silver and ops tables.
6. **audit anchor** — verifies the access audit's hash chain and records its
   signed head in `ops/audit_anchors/`, where the gateway cannot write, so that
   `affluent audit verify` detects a later truncation or rewrite; fails loudly
   when the chain is already broken.
""",
)
def affluent_maintenance():
    @task
    def erasures() -> dict:
        from jobs.stages.pipeline import process_erasure_requests

        return process_erasure_requests(task_context())

    @task
    def bronze_retention() -> dict:
        from jobs.stages.maintenance import purge_bronze

        ctx = task_context()
        return purge_bronze(ctx.spark, ctx.lake, ctx.consortium.pipeline.bronze_retention_days)

    @task
    def transient_retention() -> dict:
        from jobs.stages.maintenance import purge_transient_zones

        ctx = task_context()
        return purge_transient_zones(ctx.spark, ctx.lake, ctx.consortium.pipeline.transient_retention_days)

    # Emits the silver Assets like land does, so remapped concepts reach the extracts at the next
    # publish; skipped (no Asset event, no publish) when no row changed.
    @task(outlets=silver_assets())
    def remap() -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from jobs.terminology.remap import remap_silver

        ctx = task_context()
        updated = remap_silver(ctx.spark, ctx.lake, ctx.consortium.terminology)
        if not any(updated.values()):
            raise AirflowSkipException(f"no concept changed: {updated}")
        return updated

    @task(trigger_rule="none_failed")  # runs after a remap that had nothing to do
    def compaction() -> dict:
        from jobs.stages.maintenance import compact_and_vacuum

        ctx = task_context()
        return compact_and_vacuum(ctx.spark, ctx.lake)

    @task
    def audit_anchor() -> dict:
        from jobs.research.gateway.audit import anchor
        from jobs.core.lake import Lake
        from jobs.core.settings import Settings

        head = anchor(Lake(Settings.from_env().lake_root))
        return {"seq": head["seq"], "signed": bool(head["signature"])}

    erasures() >> bronze_retention() >> transient_retention() >> remap() >> compaction()
    audit_anchor()


affluent_maintenance()
