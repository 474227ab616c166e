"""Publish: project extracts and gold indicators, whenever a silver table changes."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetAny, dag, task

from jobs.core.registry import LAKE_WRITERS_POOL, retry_args, silver_assets, task_context


@dag(
    dag_id="affluent_publish",
    dag_display_name="Publish · project extracts and gold",
    # Unpaused from the start: a paused publish would let the Asset events of a land pass unseen, and a
    # consent withdrawal that came with that batch would not reach the extracts.
    is_paused_upon_creation=False,
    schedule=AssetAny(*silver_assets()),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["affluent", "publish"],
    # Publish rewrites extracts and gold: one at a time with land, erasure and VACUUM (one-slot pool).
    default_args={"owner": "data-stewardship", **retry_args(), "execution_timeout": timedelta(hours=2),
                  "pool": LAKE_WRITERS_POOL},
    doc_md="""
### Publish project extracts and gold

Runs when any silver table changes. Loads and validates the policies
(purposes, sharing agreements, projects): an invalid policy stops publishing.
For each active project, rebuilds `projects/<id>/` with only the persons whose
consent allows the project's purpose, the establishments whose agreement
allows it, the allowed columns, project pseudonyms and coarsened dates, then
recomputes gold indicators with small-cell suppression. Expired or revoked
projects lose their extract.

Waits for any of the silver Assets (emitted by each ingest DAG's `land`):
`silver/patient`, `silver/encounter`, `silver/diagnosis`, `silver/lab_result`,
`silver/medication`, `silver/consent`, `silver/observation`. **Must stay unpaused**: consent
withdrawals reach the extracts only through this DAG.
""",
)
def affluent_publish():
    @task
    def publish() -> dict:
        from jobs.stages.pipeline import publish_all

        return publish_all(task_context())

    publish()


affluent_publish()
