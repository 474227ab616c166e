"""Each establishment's queue of batches: which one goes next, and what holds the others back.

An establishment's batches land in delivery order, the order of their batch
ids (the landing contract asks ids that sort in delivery order, e.g.
``20260115-001``). The queue is computed from two things only: the batch
folders in landing (complete once their ``manifest.json`` is there) and the
batch log. It needs no Spark session: the log is small and is read with
delta-rs (:func:`batch_log_entries`), so the DAG's ``select_batch`` task takes
seconds.

Rules, per batch, in order:

- a steward's last decision wins: ``skip`` sets the batch aside for good (later
  batches go on); ``retry`` forgets every stop recorded before it;
- a batch delivered again after ingest with another manifest (its sha256
  differs from the one logged at ingest) goes back to the queue once, so that
  ingest refuses it and logs a ``conflict``; a landed batch stays landed, one
  not landed yet is then blocked;
- a batch whose latest entries (since the last retry) are ``rejected``,
  ``stopped`` or ``conflict`` blocks the queue: every later batch waits, with
  the reason, until a steward fixes or skips it. A batch rejected by the
  landing checks whose manifest has changed since (another sha256) is waiting
  again: the establishment fixed it;
- a batch folder without its manifest yet is an incomplete delivery: later
  batches wait for it (a steward may skip it);
- otherwise a batch is landed, in progress (ingested, not landed) or waiting.

Example::

    queue = establishment_queue(lake, landing_root, consortium, "chu_laurentides")
    print(queue.pending, queue.explain())
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from jobs.core.arrow_tables import open_delta
from jobs.core.batchlog import (
    BATCH_LOG,
    BATCH_LOG_COLUMNS,
    BLOCKING_STATUSES,
    LEGACY_KIND_PATTERN,
    QueueState,
    Stage,
    Status,
)
from jobs.core.config import Consortium
from jobs.core.lake import Lake
from jobs.stages.landing import MANIFEST, MANIFEST_NOT_A_FILE


class QueueBlocked(Exception):
    """A batch cannot go ahead: an earlier batch of its establishment is stopped or not complete."""


@dataclass(frozen=True)
class QueuedBatch:
    """One delivered batch and where it stands."""

    batch_id: str
    state: QueueState
    reason: str = ""
    stage: str | None = None
    source_file: str | None = None
    status: str | None = None  # the batch log status that blocks it, when blocked

    @property
    def moves_on(self) -> bool:
        """Whether the pipeline can work on it now (waiting or in progress)."""
        return self.state in (QueueState.WAITING, QueueState.IN_PROGRESS)

    @property
    def done(self) -> bool:
        return self.state in (QueueState.LANDED, QueueState.SKIPPED)


@dataclass(frozen=True)
class EstablishmentQueue:
    establishment_id: str
    batches: tuple[QueuedBatch, ...]

    @property
    def blocked_by(self) -> QueuedBatch | None:
        """The first batch, in delivery order, that holds the later ones back."""
        for batch in self.batches:
            if not batch.done and not batch.moves_on:
                return batch
        return None

    @property
    def pending(self) -> list[str]:
        """Batches the pipeline may take now, in delivery order: all of them come before any blocked batch."""
        ids = []
        for batch in self.batches:
            if batch.done:
                continue
            if not batch.moves_on:
                break
            ids.append(batch.batch_id)
        return ids

    @property
    def held_back(self) -> list[str]:
        """Batches waiting behind the blocking one."""
        blocker = self.blocked_by
        if blocker is None:
            return []
        after = [b for b in self.batches if b.batch_id > blocker.batch_id and not b.done]
        return [b.batch_id for b in after]

    def state_of(self, batch_id: str) -> QueuedBatch | None:
        return next((b for b in self.batches if b.batch_id == batch_id), None)

    def explain(self) -> str:
        """One sentence saying whether the queue moves, and if not why and what a steward can do."""
        blocker = self.blocked_by
        est = self.establishment_id
        if blocker is None:
            return (f"{est}: queue moving, next batch {self.pending[0]}" if self.pending
                    else f"{est}: nothing waiting")
        where = f" at {blocker.stage}" if blocker.stage else ""
        file = f" (file {blocker.source_file})" if blocker.source_file else ""
        waiting = f"; {len(self.held_back)} later batch(es) wait: {', '.join(self.held_back)}" if self.held_back else ""
        action = (f"fix it, then `affluent batch retry {est} {blocker.batch_id}`, or "
                  f"`affluent batch skip {est} {blocker.batch_id} --reason …`")
        if blocker.status == Status.REJECTED and blocker.stage == Stage.INGEST:
            # A changed manifest.json takes a rejected batch again by itself (batch_state): no retry to run.
            action = (f"the establishment re-delivers it (corrected files and manifest.json): it is taken again "
                      f"by itself, no retry needed; if the profile was at fault, fix it and `affluent batch retry "
                      f"{est} {blocker.batch_id}`; or `affluent batch skip {est} {blocker.batch_id} --reason …`")
        if blocker.status == Status.HELD:
            action = (f"read its validation report and quarantine, then `affluent onboarding accept {est} "
                      "--reason …` (or fix the profile first)")
        if blocker.state == QueueState.INCOMPLETE:
            action = f"wait for its manifest, or `affluent batch skip {est} {blocker.batch_id} --reason …`"
        return f"{est}: queue blocked by {blocker.batch_id}, {blocker.state}{where}{file}: {blocker.reason}{waiting}. {action}"

    def require_turn(self, batch_id: str) -> None:
        """Raise :class:`QueueBlocked` unless every batch delivered before ``batch_id`` is landed or skipped."""
        for batch in self.batches:
            if batch.batch_id >= batch_id:
                return
            if not batch.done:
                raise QueueBlocked(
                    f"batch {self.establishment_id}/{batch_id} cannot land before {batch.batch_id} "
                    f"({batch.state}{': ' + batch.reason if batch.reason else ''}): batches of an establishment "
                    f"land in delivery order. {self.explain()}")


# ------------------------------------------------------------- batch log ----

def batch_log_entries(lake: Lake, establishment_id: str | None = None) -> list[dict]:
    """The batch log as plain dicts (one per entry, oldest first), read with delta-rs: no Spark session.

    Entries written before the typed columns existed read them as ``None``
    (and ``kind`` from their message), like :func:`jobs.core.ops.read_batch_log`.
    """
    table = open_delta(lake.ops(BATCH_LOG))
    if table is None:
        return []
    filters = [("establishment_id", "=", establishment_id)] if establishment_id else None
    entries = []
    for row in table.to_pyarrow_table(filters=filters).to_pylist():
        entry = {name: row.get(name) for name in BATCH_LOG_COLUMNS}
        if entry["kind"] is None and entry["message"]:
            legacy = re.match(LEGACY_KIND_PATTERN, entry["message"])
            entry["kind"] = legacy.group(1) if legacy else None
        entries.append(entry)
    return sorted(entries, key=lambda e: utc(e["recorded_at"]))


def latest_batch_entries(lake: Lake, establishment_id: str, batch_id: str) -> dict[tuple[str | None, str], dict]:
    """The latest batch-log entry of one batch per ``(dataset, stage)`` (delta-rs, no Spark session)."""
    latest: dict[tuple[str | None, str], dict] = {}
    for entry in batch_log_entries(lake, establishment_id):  # oldest first: later entries replace earlier ones
        if entry["batch_id"] == batch_id:
            latest[(entry["dataset"], entry["stage"])] = entry
    return latest


def ingested_entries(lake: Lake, establishment_id: str, batch_id: str) -> dict[str, dict]:
    """Per dataset, the batch's latest ingest entry when it says ``ingested``: the rows ingest counted
    after writing (``rows_read``, ``rows_quarantined``), the batch's ``kind`` and ``extracted_at``."""
    return {dataset: entry for (dataset, stage), entry in latest_batch_entries(lake, establishment_id, batch_id).items()
            if dataset and stage == Stage.INGEST and entry["status"] == Status.INGESTED}


def utc(value: dt.datetime | None) -> dt.datetime:
    if value is None:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


# --------------------------------------------------------------- landing ----

def manifest_sha256(folder: Path) -> str | None:
    """sha256 of a batch's ``manifest.json`` bytes; ``None`` while it is missing.

    A manifest that is not a regular file (a directory, a link, a pipe) gives
    :data:`MANIFEST_NOT_A_FILE`: the batch is delivered but broken, so it takes
    its turn and ingest rejects it in the batch log; it never stops the queue
    from being read (earlier batches still land), and reading a pipe would hang.
    """
    path = folder / MANIFEST
    try:
        mode = path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(mode):
        return MANIFEST_NOT_A_FILE
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:  # unreadable (permissions): ingest rejects it with the reason
        return MANIFEST_NOT_A_FILE


def delivered_batches(landing_root: Path, landing_folder: str) -> list[str]:
    """Every batch folder of an establishment, complete or not, in delivery (batch id) order."""
    folder = landing_root / landing_folder
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# ----------------------------------------------------------------- state ----

def batch_state(batch_id: str, entries: list[dict], manifest: str | None) -> QueuedBatch:
    """Where one batch stands, from its batch log entries (oldest first) and its manifest's sha256."""
    steward = [e for e in entries if e["stage"] == Stage.STEWARD]
    if steward and steward[-1]["status"] == Status.SKIPPED:
        return QueuedBatch(batch_id, QueueState.SKIPPED, steward[-1]["message"] or "", Stage.STEWARD)
    if manifest is None:
        return QueuedBatch(batch_id, QueueState.INCOMPLETE, f"no {MANIFEST} yet: the delivery is not complete")
    retried_at = utc(steward[-1]["recorded_at"]) if steward else None
    flow = [e for e in entries if e["stage"] != Stage.STEWARD]
    ingested = [e for e in flow if e["stage"] == Stage.INGEST and e["status"] == Status.INGESTED]
    landed = any(e["stage"] == Stage.LAND and e["status"] == Status.LANDED for e in flow)

    ingested_manifest = ingested[-1]["manifest_sha256"] if ingested else None
    if ingested_manifest and manifest != ingested_manifest and not any(
            e["status"] == Status.CONFLICT and e["manifest_sha256"] == manifest for e in flow):
        return QueuedBatch(batch_id, QueueState.WAITING,
                           "delivered again with another manifest after ingest: ingest will log the conflict")
    if landed:
        return QueuedBatch(batch_id, QueueState.LANDED)

    recent = [e for e in flow if retried_at is None or utc(e["recorded_at"]) > retried_at]
    if recent:
        last_at = utc(recent[-1]["recorded_at"])
        last = [e for e in recent if utc(e["recorded_at"]) == last_at]
        stops = [e for e in last if e["status"] in BLOCKING_STATUSES]
        if stops:
            stop = stops[0]
            # Rejected at ingest on another manifest (or before its manifest was there): check it again.
            fixed = (stop["stage"] == Stage.INGEST and stop["status"] == Status.REJECTED
                     and stop["manifest_sha256"] != manifest)
            if fixed:
                return QueuedBatch(batch_id, QueueState.WAITING, "manifest changed since its rejection")
            reason = "; ".join(dict.fromkeys(e["message"] or e["status"] for e in stops))
            return QueuedBatch(batch_id, QueueState.BLOCKED, f"{stop['status']}: {reason}", stop["stage"],
                               stop["source_file"], stop["status"])
    if ingested:
        return QueuedBatch(batch_id, QueueState.IN_PROGRESS)
    return QueuedBatch(batch_id, QueueState.WAITING)


def establishment_queue(lake: Lake, landing_root: Path, consortium: Consortium, establishment_id: str,
                        entries: list[dict] | None = None) -> EstablishmentQueue:
    """The queue of one establishment: every delivered batch, in delivery order, with its state."""
    est = consortium.establishment(establishment_id)
    if entries is None:
        entries = batch_log_entries(lake, establishment_id)
    by_batch: dict[str, list[dict]] = {}
    for entry in entries:
        if entry["establishment_id"] == establishment_id:
            by_batch.setdefault(entry["batch_id"], []).append(entry)
    base = landing_root / est.landing_folder
    batches = tuple(batch_state(b, by_batch.get(b, []), manifest_sha256(base / b))
                    for b in delivered_batches(landing_root, est.landing_folder))
    return EstablishmentQueue(establishment_id, batches)


def pending_batches(lake: Lake, landing_root: Path, consortium: Consortium, establishment_id: str) -> list[str]:
    """Batches of an establishment the pipeline may take now, in delivery order."""
    return establishment_queue(lake, landing_root, consortium, establishment_id).pending


def delivered_manifest(landing_root: Path, consortium: Consortium, establishment_id: str, batch_id: str) -> str | None:
    """sha256 of the manifest as delivered now; ``None`` for an unknown establishment or an invalid batch id."""
    from jobs.stages.landing import BATCH_ID_PATTERN

    est = consortium.establishments.get(establishment_id)
    if est is None or not BATCH_ID_PATTERN.match(batch_id):
        return None
    return manifest_sha256(landing_root / est.landing_folder / batch_id)


def redelivery_conflict(lake: Lake, landing_root: Path, consortium: Consortium, establishment_id: str,
                        batch_id: str) -> str | None:
    """The new manifest's sha256 when a batch already ingested is delivered again with another content.

    ``None`` when there is no conflict, or when this re-delivery's conflict is already in the log.
    """
    manifest = delivered_manifest(landing_root, consortium, establishment_id, batch_id)
    if manifest is None:
        return None
    flow = [e for e in batch_log_entries(lake, establishment_id) if e["batch_id"] == batch_id]
    ingested = [e for e in flow if e["stage"] == Stage.INGEST and e["status"] == Status.INGESTED]
    first = ingested[-1]["manifest_sha256"] if ingested else None
    if first is None or first == manifest:
        return None
    if any(e["status"] == Status.CONFLICT and e["manifest_sha256"] == manifest for e in flow):
        return None
    return manifest
