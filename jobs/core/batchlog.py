"""The batch log's vocabulary, named once: stages, statuses, batch kinds and the rejection error.

Every stage writes these names to ``ops/batch_log`` and every reader (the
queue, land's reconciliation, the CLI, the DAGs) compares against them, so a
typo is an ``AttributeError`` instead of a batch that silently never matches.
This module imports nothing heavy: DAG files and the landing checks use it.

Example::

    from jobs.core.batchlog import Stage, Status
    log.where((F.col("stage") == Stage.LAND) & (F.col("status") == Status.LANDED))
"""

from __future__ import annotations

from enum import StrEnum

# The batch log's table name under the ops zone (``Lake.ops(BATCH_LOG)``).
BATCH_LOG = "batch_log"
# Columns of the batch log, in order (the Spark schema is ``jobs.core.ops.BATCH_LOG_SCHEMA``).
BATCH_LOG_COLUMNS = ("establishment_id", "batch_id", "dataset", "stage", "status", "rows_read", "rows_landed",
                     "rows_quarantined", "rows_duplicates", "message", "extracted_at", "recorded_at", "kind",
                     "manifest_sha256", "source_file", "rows_not_collected", "rows_unchanged")
# How entries written before the typed ``kind`` column said it (``kind=full; …``).
LEGACY_KIND_PATTERN = r"^kind=(\w+)"


class Stage(StrEnum):
    """Where a batch log entry was written: the four stages of the flow, and a steward's decision."""

    INGEST = "ingest"
    PSEUDONYMISE = "pseudonymise"
    VALIDATE = "validate"
    LAND = "land"
    # Not a stage of the flow: a data steward's skip or retry of a batch (``affluent batch skip|retry``).
    STEWARD = "steward"
    # Not a stage of the flow: a run of a batch refused because another run of it was going on.
    RUN = "run"


# The flow, in order.
PIPELINE_STAGES: tuple[Stage, ...] = (Stage.INGEST, Stage.PSEUDONYMISE, Stage.VALIDATE, Stage.LAND)


class Status(StrEnum):
    """What happened to a batch at a stage."""

    INGESTED = "ingested"
    PSEUDONYMISED = "pseudonymised"
    VALIDATED = "validated"
    LANDED = "landed"
    # The batch breaks the landing contract (manifest, files, checksums, counts, bytes in paths).
    REJECTED = "rejected"
    # A later stage refused the batch (batch-level rule, reconciliation); nothing of it landed.
    STOPPED = "stopped"
    # Delivered again after ingest with other content: the first delivery stays, the new one is refused.
    CONFLICT = "conflict"
    # Land waits: the establishment is onboarding and its profile is not accepted yet (jobs.stages.onboarding).
    HELD = "held"
    # Stage ``run``: another run of the batch held it; this one changed nothing (never blocks the queue).
    ALREADY_RUNNING = "already_running"
    # Steward decisions (stage ``steward``).
    SKIPPED = "skipped"
    RETRY = "retry"


# Statuses that stop a batch, and with it every later batch of its establishment, until a steward acts.
BLOCKING_STATUSES = frozenset({Status.REJECTED, Status.STOPPED, Status.CONFLICT, Status.HELD})


class BatchKind(StrEnum):
    """The manifest's ``kind``: every current record, or only new, changed and deleted ones."""

    FULL = "full"
    INCREMENTAL = "incremental"


class QueueState(StrEnum):
    """Where a delivered batch stands in its establishment's queue (computed from landing + the batch log)."""

    WAITING = "waiting"          # complete in landing, not started (or fixed after a rejection)
    IN_PROGRESS = "in progress"  # ingested, not landed yet, nothing stopped it
    BLOCKED = "blocked"          # rejected, stopped or in conflict: later batches wait for a steward
    LANDED = "landed"
    SKIPPED = "skipped"          # a steward set it aside; later batches go on
    INCOMPLETE = "incomplete"    # its folder is there, its manifest not yet: later batches wait for it


class BatchRejected(Exception):
    """The batch cannot go on: it breaks the landing contract or a batch-level rule. Nothing of it lands.

    ``file`` names the manifest entry at fault when there is one; ``failures``
    lists the batch-level rules that failed at validate (empty otherwise).
    """

    def __init__(self, establishment_id: str, batch_id: str, reason: str, file: str | None = None,
                 failures: tuple = ()):
        self.establishment_id, self.batch_id, self.reason = establishment_id, batch_id, reason
        self.file, self.failures = file, list(failures)
        super().__init__(f"batch {establishment_id}/{batch_id} rejected: {reason}")
