"""Releasing checkpointed DataFrames of a Spark Connect client at safe points, not from the garbage collector.

A ``localCheckpoint()`` through Spark Connect keeps the rows in the service under
an id; PySpark's client releases them from the plan's finaliser
(``CachedRemoteRelation.__del__``) with a blocking gRPC call. The garbage
collector runs finalisers wherever it happens to run: inside another gRPC call
of the same channel (its state locked while it starts a thread), that release
call waits for a lock its own thread holds and the process hangs for good.
PySpark guards its own query calls by switching the collector off around them,
but that switch is process-wide and several threads (``jobs.core.tables``) undo
each other's.

:func:`defer_releases` (installed with the first client session) makes the
finaliser only note the id; :func:`release_pending` sends the notes, from a
point where no other call is in flight: the end of each stage
(:func:`jobs.stages.pipeline.one_run_per_batch`) and before a new client
session is handed out. A session that closes first releases everything anyway.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

LOG = logging.getLogger(__name__)

_PENDING: list[tuple[Any, str]] = []  # (client session, relation id), appended by finalisers
_LOCK = threading.Lock()
_INSTALLED = False


def _note_release(plan: Any) -> None:
    """The finaliser of a checkpointed plan: note its id for :func:`release_pending`; no call, no lock."""
    session, relation_id = getattr(plan, "_spark_session", None), getattr(plan, "_relation_id", None)
    if session is not None and relation_id is not None:
        _PENDING.append((session, relation_id))  # one bytecode under the GIL: safe inside the collector
        plan._relation_id = None


def defer_releases() -> None:
    """Replace PySpark's releasing finaliser by :func:`_note_release` (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from pyspark.sql.connect.plan import CachedRemoteRelation

    CachedRemoteRelation.__del__ = _note_release  # type: ignore[method-assign]
    _INSTALLED = True


def pending() -> list[str]:
    """Relation ids noted and not yet released."""
    return [relation_id for _, relation_id in _PENDING]


def release_pending() -> int:
    """Release every noted checkpoint in the service; how many were released. Call where no other Spark
    call is in flight (between stages, after one that succeeded: a service that is down would make each call
    wait out its retries). A closed session's checkpoints went with it and are skipped."""
    if not _PENDING:
        return 0
    from pyspark.sql.connect.proto import Command

    released = 0
    with _LOCK:
        while _PENDING:
            session, relation_id = _PENDING.pop()
            if session.client.is_closed:
                continue
            command = Command()
            command.remove_cached_remote_relation_command.relation.relation_id = relation_id
            try:
                session.client.execute_command(command)
            except Exception as exc:  # noqa: BLE001 - best effort, as PySpark's own release: the session frees it at its end
                LOG.warning("could not release checkpoint %s in the Spark service: %s", relation_id, exc)
                continue
            released += 1
    return released
