"""Entry points of the flow, one per stage, shared by the CLI and the Airflow tasks.

Each takes ids (establishment, batch) and returns small, JSON-able summaries:
what Airflow may keep in XCom. Data moves only through Delta tables.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from functools import cached_property

from pyspark.sql import SparkSession

from jobs.core import clock
from jobs.core.batchlog import PIPELINE_STAGES, Stage, Status
from jobs.core.config import Consortium, load_consortium
from jobs.privacy.crypto import ServiceKey
from jobs.privacy.keys import PseudonymKey, load_key
from jobs.core.lake import Lake
from jobs.core.settings import Settings

STAGES = tuple(stage.value for stage in PIPELINE_STAGES)


@dataclass
class Context:
    """What every stage needs: settings, the validated configuration, the lake, Spark."""

    settings: Settings
    spark_master: str | None = None
    # The landing size of the batch a stage is running (tune_session), applied to the session when made;
    # None with batch_tuned: a batch whose landing folder is gone, of unknown size.
    batch_bytes: int | None = None
    batch_tuned: bool = False

    @cached_property
    def consortium(self) -> Consortium:
        return load_consortium(self.settings.config_dir)

    @cached_property
    def lake(self) -> Lake:
        return Lake(self.settings.lake_root)

    @cached_property
    def key(self) -> PseudonymKey | ServiceKey:
        """The key: this process's own, or through the Spark service only its fingerprint and purposes."""
        from jobs.core.session import remote_url

        if remote_url():
            return ServiceKey(self.spark)  # the service holds the key; this process never reads it
        return load_key()

    @cached_property
    def spark(self) -> SparkSession:
        from jobs.core.session import get_spark

        settings = self.settings
        if self.spark_master:
            settings = Settings.from_env(spark_master=self.spark_master, lake_root=settings.lake_root,
                                         config_dir=str(settings.config_dir))
        spark = get_spark(settings, app_name="affluent")
        if self.batch_tuned:
            from jobs.core.session import tune_for_batch

            tune_for_batch(spark, self.batch_bytes)
        return spark

    @classmethod
    def from_env(cls, spark_master: str | None = None) -> "Context":
        return cls(Settings.from_env(), spark_master)


def queue(ctx: Context, establishment_id: str):
    """The establishment's batches in delivery order and where each stands; read without Spark."""
    from jobs.stages.batch_queue import establishment_queue

    return establishment_queue(ctx.lake, ctx.settings.landing, ctx.consortium, establishment_id)


def pending(ctx: Context, establishment_id: str) -> list[str]:
    """Batches the pipeline may take now, in delivery order; none past a batch that is stopped."""
    return queue(ctx, establishment_id).pending


def one_run_per_batch(stage):
    """Run ``stage(ctx, establishment_id, batch_id)`` holding its batch; a second run of it is logged and refused.

    Two runs of one batch at once (a command while the DAG runs it) would both
    write it and the second would fail in Delta's commit; instead it ends at
    once with :class:`~jobs.core.writer_lock.BatchAlreadyRunning` and an
    ``already_running`` entry in the batch log (stage ``run``, never blocking).
    """
    @functools.wraps(stage)
    def run(ctx: Context, establishment_id: str, batch_id: str) -> dict:
        from jobs.core.writer_lock import BatchAlreadyRunning, batch_run

        try:
            with batch_run(ctx.lake.root, establishment_id, batch_id, stage.__name__):
                tune_session(ctx, establishment_id, batch_id)
                outcome = stage(ctx, establishment_id, batch_id)
            release_checkpoints()
            return outcome
        except BatchAlreadyRunning as refused:
            from jobs.core.ops import append_batch_log

            append_batch_log(ctx.spark, ctx.lake, [{
                "establishment_id": establishment_id, "batch_id": batch_id, "stage": Stage.RUN,
                "status": Status.ALREADY_RUNNING, "message": str(refused)}])
            raise
    return run


def release_checkpoints() -> None:
    """A stage's checkpoints in the Spark service, released once it ended well (:mod:`jobs.core.checkpoints`)."""
    from jobs.core.checkpoints import release_pending

    release_pending()


def landing_bytes(ctx: Context, establishment_id: str, batch_id: str) -> int | None:
    """What the establishment delivered for the batch, in bytes (its landing folder's files); None when the
    folder is gone (landing retention, an unknown establishment): the batch's size is not known then."""
    est = ctx.consortium.establishments.get(establishment_id)
    if est is None:
        return None
    folder = ctx.settings.landing / est.landing_folder / batch_id
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else None


def tune_session(ctx: Context, establishment_id: str, batch_id: str) -> None:
    """The session's execution mode for this batch's size (:func:`jobs.core.session.tune_for_batch`).

    Applied now when the session exists, else as soon as the stage makes it: a stage that reads the
    key first (ingest, pseudonymise, land) still fails on a missing key before any Spark starts.
    """
    ctx.batch_bytes, ctx.batch_tuned = landing_bytes(ctx, establishment_id, batch_id), True
    if "spark" in ctx.__dict__:
        from jobs.core.session import tune_for_batch

        tune_for_batch(ctx.spark, ctx.batch_bytes)


def require_key(ctx: Context) -> PseudonymKey | ServiceKey:
    """The key, read before anything is written beyond landing.

    Bronze already holds identifiers: a batch is not even ingested when it
    could not be pseudonymised (missing or weak key), so the stage fails closed.
    """
    return ctx.key


@one_run_per_batch
def ingest(ctx: Context, establishment_id: str, batch_id: str) -> dict:
    from jobs.stages.ingest import ingest_batch

    require_key(ctx)
    return asdict(ingest_batch(ctx.spark, ctx.lake, ctx.settings.landing, ctx.consortium, establishment_id, batch_id))


@one_run_per_batch
def pseudonymise(ctx: Context, establishment_id: str, batch_id: str) -> dict:
    from jobs.stages.pseudonymise import pseudonymise_batch

    key = ctx.key  # read before Spark starts: a missing key stops the job at once
    return asdict(pseudonymise_batch(ctx.spark, ctx.lake, ctx.consortium, key, establishment_id, batch_id))


def _landed(ctx: Context, establishment_id: str, batch_id: str) -> bool:
    from jobs.core.ops import batches_with_status

    return batch_id in batches_with_status(ctx.lake, establishment_id, Stage.LAND, Status.LANDED)


@one_run_per_batch
def validate(ctx: Context, establishment_id: str, batch_id: str) -> dict:
    """Validate a batch; a batch already landed is not validated again (re-runs change nothing)."""
    from jobs.stages.ingest import batch_kind
    from jobs.stages.validate import validate_batch

    require_key(ctx)
    if _landed(ctx, establishment_id, batch_id):
        return {"skipped": True, "reason": "batch already landed"}
    kind = batch_kind(ctx.lake, establishment_id, batch_id)
    return _summary(validate_batch(ctx.spark, ctx.lake, ctx.consortium, establishment_id, batch_id, kind))


@one_run_per_batch
def land(ctx: Context, establishment_id: str, batch_id: str) -> dict:
    from jobs.stages.land import land_batch
    from jobs.stages.maintenance import purge_transient

    key = ctx.key
    if _landed(ctx, establishment_id, batch_id):
        return {"skipped": True, "reason": "batch already landed"}
    queue(ctx, establishment_id).require_turn(batch_id)  # batches of an establishment land in delivery order
    from jobs.stages.onboarding import hold_unless_accepted

    hold_unless_accepted(ctx.spark, ctx.lake, ctx.consortium, establishment_id, batch_id)  # onboarding: held
    landed = _summary(land_batch(ctx.spark, ctx.lake, establishment_id, batch_id, key.fingerprint,
                                 ctx.consortium.terminology))
    # staged/ and validated/ are transient: a landed batch leaves them (its rows are in silver now).
    purge_transient(ctx.spark, ctx.lake, establishment_id, batch_id)
    return landed


@one_run_per_batch
def run_batch(ctx: Context, establishment_id: str, batch_id: str) -> dict:
    """Every stage of one batch, in order."""
    return {stage: globals()[stage](ctx, establishment_id, batch_id) for stage in STAGES}


def _summary(outcome) -> dict:
    try:
        return asdict(outcome)
    except TypeError:
        return {"result": str(outcome)}


def permanent_failures() -> tuple[type[Exception], ...]:
    """Errors that a retry cannot fix: the batch, the configuration or the key must change first.

    The DAGs fail these at once instead of retrying (a rejected batch retried
    twice is only a later failure with the same message).
    """
    from jobs.core.config import ConfigError
    from jobs.stages.ingest import IngestReconciliationError
    from jobs.privacy.keys import KeyMismatchError, MissingKeyError, WeakKeyError
    from jobs.stages.land import BatchNotValidated, ReconciliationError
    from jobs.stages.batch_queue import QueueBlocked
    from jobs.core.batchlog import BatchRejected
    from jobs.stages.validate import EngineDisagreement, SuiteError
    from jobs.privacy.erasure import ErasureIncomplete
    from jobs.privacy.relink import RelinkRiskExceeded

    return (BatchRejected, QueueBlocked, ConfigError, IngestReconciliationError, KeyMismatchError, MissingKeyError,
            WeakKeyError, BatchNotValidated, ReconciliationError, EngineDisagreement, SuiteError,
            ErasureIncomplete, RelinkRiskExceeded)


def spark_master_from_connection(conn_id: str = "spark_default") -> str | None:
    """The Spark master URL of an Airflow connection (``local[*]`` or ``spark://host:7077``).

    Read in the task, never at DAG parse time. ``None`` when the connection is
    not defined: the embedded default (AFFLUENT_SPARK_MASTER or ``local[*]``) applies.
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException, AirflowRuntimeError

    try:
        conn = Connection.get(conn_id)
    except (AirflowRuntimeError, AirflowNotFoundException):  # the latter from a task's own look-up (Airflow 3.3)
        return None
    host = (conn.host or "").strip()
    if not host:
        return None
    if host.startswith("local"):
        return host
    if "://" not in host:
        host = f"spark://{host}"
    return f"{host}:{conn.port}" if conn.port else host


def publish_all(ctx: Context) -> dict:
    """Rebuild every active project's extract and the gold indicators."""

    from jobs.stages.publish import publish

    key = ctx.key
    outcome = _summary(publish(ctx.spark, ctx.lake, ctx.consortium, key, clock.today()))
    release_checkpoints()
    return outcome


def process_erasure_requests(ctx: Context) -> dict:
    from jobs.privacy.erasure import process_erasures

    key = ctx.key
    outcome = _summary(process_erasures(ctx.spark, ctx.lake, ctx.consortium, key))
    release_checkpoints()
    return outcome
