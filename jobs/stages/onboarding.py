"""Onboarding mode: a new establishment's batches are validated and reported, not landed, until accepted.

An establishment's file sets ``onboarding: true`` while its profile is being
tuned. Its batches go through ingest, pseudonymise and validate as usual (the
quarantine and the validation report show what the profile does to real
extracts), then land holds them: the batch log records ``land``/``held`` and
the establishment's queue waits. A steward who has read the reports accepts
the profile:

    affluent onboarding accept clinique_nord --reason "reports reviewed with the establishment"

The acceptance is recorded in ``ops/onboarding`` with the profile's sha256:
it covers that profile only, so a profile changed afterwards must be accepted
again. The held batches are then taken again (a steward ``retry`` entry) and
land. Removing ``onboarding: true`` once the establishment is settled is
enough; its acceptances stay in ``ops/onboarding`` as a record.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os

from jobs.core.batchlog import BatchRejected, Stage, Status
from jobs.core.config import Consortium
from jobs.core.lake import Lake

ONBOARDING_TABLE = "onboarding"


class BatchHeld(BatchRejected):
    """The establishment is onboarding and its current profile has not been accepted: the batch waits."""


def profile_sha256(consortium: Consortium, establishment_id: str) -> str:
    """The sha256 of the establishment's input profile, as validated (key order and YAML layout do not matter)."""
    est = consortium.establishment(establishment_id)
    canonical = json.dumps(est.input.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def acceptances(lake: Lake, establishment_id: str) -> list[dict]:
    """Every recorded acceptance of the establishment's profiles, oldest first (delta-rs: no Spark)."""
    from jobs.core.arrow_tables import open_delta

    table = open_delta(lake.ops(ONBOARDING_TABLE))
    if table is None:
        return []
    rows = table.to_pyarrow_table(filters=[("establishment_id", "=", establishment_id)]).to_pylist()
    return sorted(rows, key=lambda r: r["accepted_at"])


def is_accepted(lake: Lake, consortium: Consortium, establishment_id: str) -> bool:
    """Whether the establishment may land: not onboarding, or its current profile was accepted."""
    if not consortium.establishment(establishment_id).onboarding:
        return True
    current = profile_sha256(consortium, establishment_id)
    return any(a["profile_sha256"] == current for a in acceptances(lake, establishment_id))


def hold_unless_accepted(spark, lake: Lake, consortium: Consortium, establishment_id: str, batch_id: str) -> None:
    """Raise :class:`BatchHeld` (and log ``land``/``held``) when the establishment's profile awaits acceptance."""
    from jobs.core.ops import append_batch_log

    if is_accepted(lake, consortium, establishment_id):
        return
    message = (f"{establishment_id} is onboarding: batch {batch_id} is validated and reported but does not land "
               f"until a steward accepts the profile (read the validation report and the quarantine, then "
               f"`affluent onboarding accept {establishment_id} --reason …`)")
    append_batch_log(spark, lake, [{"establishment_id": establishment_id, "batch_id": batch_id,
                                    "stage": Stage.LAND, "status": Status.HELD, "message": message}])
    raise BatchHeld(establishment_id, batch_id, message)


def accept(spark, lake: Lake, consortium: Consortium, establishment_id: str, reason: str,
           held_batches: list[str], user: str | None = None) -> str:
    """Record the acceptance of the establishment's current profile; take its held batches again. Its sha256."""
    from jobs.core.ops import append_batch_log
    from jobs.core.tables import APPEND

    est = consortium.establishment(establishment_id)
    if not est.onboarding:
        raise ValueError(f"{establishment_id} is not onboarding (no `onboarding: true` in "
                         f"config/establishments/{establishment_id}.yaml): its batches land without acceptance")
    if not reason.strip():
        raise ValueError("an acceptance needs a reason (kept in ops/onboarding)")
    digest = profile_sha256(consortium, establishment_id)
    user = user or os.environ.get("USER", "unknown")
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    (spark.createDataFrame([(establishment_id, digest, user, reason, now)],
                           "establishment_id string, profile_sha256 string, accepted_by string, reason string, "
                           "accepted_at timestamp")
     .write.format("delta").mode(APPEND).save(lake.ops(ONBOARDING_TABLE)))
    append_batch_log(spark, lake, [{"establishment_id": establishment_id, "batch_id": batch,
                                    "stage": Stage.STEWARD, "status": Status.RETRY,
                                    "message": f"onboarding profile accepted: {reason} (by {user})"}
                                   for batch in held_batches])
    return digest
