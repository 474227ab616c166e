"""The DAGs that make consent and erasure take effect, and who says when they are paused.

Landing a batch changes silver; the change reaches the project extracts only
when ``affluent_publish`` runs (a consent withdrawal included), and erasure
requests are carried out only when ``affluent_maintenance`` runs. Both are
created unpaused; this module lets an ingest run (``select_batch``) and
``affluent batches`` say loudly when one of them is paused anyway, and what is
waiting for it. Everything here reads the lake with delta-rs: no Spark.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable

from jobs.core.arrow_tables import open_delta
from jobs.core.lake import Lake
from jobs.core.registry import CANONICAL_DATASETS

PUBLISH_DAG = "affluent_publish"
MAINTENANCE_DAG = "affluent_maintenance"
SAFETY_DAGS = {
    PUBLISH_DAG: "consent withdrawals and newly landed batches reach the project extracts only when it runs",
    MAINTENANCE_DAG: "erasure requests are carried out, and old files purged, only when it runs",
}
# A manual run that started this long after it was requested waited behind another run of its DAG.
QUEUED_BEHIND = dt.timedelta(seconds=30)


def _rows(table, columns: list[str]) -> list[dict]:
    """A table's current rows, deletion vectors applied (``scan``: see :mod:`jobs.core.arrow_tables`)."""
    import pyarrow as pa

    return pa.RecordBatchReader.from_stream(table.scan(columns=columns)).read_all().to_pylist()


def _version(path: str) -> int | None:
    table = open_delta(path)
    return None if table is None else table.version()


def unpublished_silver(lake: Lake, project_ids: Iterable[str]) -> list[str]:
    """Silver datasets whose table changed after the last publish read them (every dataset when none did)."""
    from jobs.stages.publish import MANIFEST

    current = {d: v for d in CANONICAL_DATASETS if (v := _version(lake.silver(d))) is not None}
    last: tuple[dt.datetime, dict[str, int]] | None = None
    for project_id in project_ids:
        manifest = open_delta(lake.project(project_id, MANIFEST))
        if manifest is None:
            continue
        for row in _rows(manifest, ["published_at", "silver_versions"]):
            if last is None or row["published_at"] > last[0]:
                last = (row["published_at"], dict(row["silver_versions"] or []))
    read = last[1] if last else {}
    return sorted(d for d, version in current.items() if read.get(d, -1) < version)


def pending_erasures(lake: Lake) -> int:
    """Erasure requests recorded and not carried out yet."""
    from jobs.privacy.erasure import ERASURE_REQUESTS, STATUS_PENDING

    requests = open_delta(lake.ops(ERASURE_REQUESTS))
    if requests is None:
        return 0
    return sum(r["status"] == STATUS_PENDING for r in _rows(requests, ["status"]))


def paused_warnings(paused: Iterable[str], lake: Lake, project_ids: Iterable[str]) -> list[str]:
    """One message per paused safety DAG, naming what waits for it and how to unpause it."""
    paused = set(paused) & set(SAFETY_DAGS)
    if not paused:
        return []
    out = []
    for dag_id in sorted(paused):  # only what a paused DAG holds back is read
        if dag_id == PUBLISH_DAG:
            changed = unpublished_silver(lake, project_ids)
            what = (f"silver changed since the last publish ({', '.join(changed)})" if changed
                    else "silver has not changed since the last publish yet")
        else:
            what = f"{pending_erasures(lake)} erasure request(s) pending"
        out.append(f"{dag_id} is PAUSED: {SAFETY_DAGS[dag_id]}; {what}. "
                   f"Unpause it in the UI or with `airflow dags unpause {dag_id}`.")
    return out


def paused_in_airflow() -> set[str] | None:
    """The safety DAGs paused in Airflow's metadata database; ``None`` when no Airflow is configured here.

    For the command line (``affluent batches``), where ``AIRFLOW_HOME`` points
    at the deployment's Airflow; tasks ask their API server instead
    (:func:`paused_from_task`).
    """
    if not os.environ.get("AIRFLOW_HOME"):
        return None
    try:
        from airflow.models.dag import DagModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            rows = session.execute(select(DagModel.dag_id, DagModel.is_paused)
                                   .where(DagModel.dag_id.in_(list(SAFETY_DAGS)))).all()
    except Exception:  # noqa: BLE001 - no metadata database here: the state is unknown, not "unpaused"
        return None
    return {dag_id for dag_id, is_paused in rows if is_paused}


def paused_from_task(task_instance) -> tuple[set[str], list[str]]:
    """The safety DAGs paused, asked from a running task through Airflow's API; and the DAGs it could not ask about."""
    paused, unknown = set(), []
    for dag_id in SAFETY_DAGS:
        try:
            if task_instance.get_dag(dag_id).is_paused:
                paused.add(dag_id)
        except Exception:  # noqa: BLE001 - e.g. the DAG is not deployed: say so rather than assume it runs
            unknown.append(dag_id)
    return paused, unknown


def manual_run_note(run_type: str, requested_at: dt.datetime | None, start_date: dt.datetime | None) -> str | None:
    """What a manual run that started well after it was requested says in its log: it waited behind another run."""
    if str(run_type).lower().removeprefix("dagruntype.") != "manual" or not requested_at or not start_date:
        return None
    waited = start_date - requested_at
    if waited < QUEUED_BEHIND:
        return None
    return (f"this manual run was requested at {requested_at:%Y-%m-%d %H:%M:%S} UTC and started "
            f"{int(waited.total_seconds())} s later: an establishment runs one DAG run at a time (batches land in "
            "delivery order), so it waited for the run that was active (the hourly scheduled one, or another "
            "manual run). A batch that run already took is not processed twice: its stages change nothing.")
