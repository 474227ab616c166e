"""Onboarding mode: validated and reported, held before land, until a steward accepts the profile."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil

import pytest
import yaml

from jobs.stages.batch_queue import batch_state
from jobs.core.batchlog import QueueState, Stage, Status
from jobs.stages.onboarding import profile_sha256
from tests.conftest import CONFIG_DIR, TEST_KEY
from tests.privacy_helpers import BATCH, EST, write_planted_batch


def _onboarding(consortium, establishment_id=EST, **profile_changes):
    est = consortium.establishments[establishment_id]
    changed = est.model_copy(update={"onboarding": True,
                                     "input": est.input.model_copy(update=profile_changes)})
    return dataclasses.replace(consortium, establishments={**consortium.establishments, establishment_id: changed})


def test_the_profile_digest_follows_the_profile_not_the_file_layout(consortium):
    digest = profile_sha256(consortium, EST)
    assert profile_sha256(_onboarding(consortium), EST) == digest  # the flag is not the profile
    assert profile_sha256(_onboarding(consortium, decimal_separator="."), EST) != digest


def test_a_held_batch_blocks_its_queue_and_says_how_to_accept():
    from jobs.stages.batch_queue import EstablishmentQueue

    now = dt.datetime(2026, 1, 6, tzinfo=dt.timezone.utc)
    entry = {"stage": Stage.INGEST, "status": Status.INGESTED, "manifest_sha256": "m", "recorded_at": now,
             "message": None, "source_file": None}
    held = dict(entry, stage=Stage.LAND, status=Status.HELD, recorded_at=now + dt.timedelta(hours=1),
                message="clinique is onboarding")
    state = batch_state("20260105-001", [entry, held], "m")
    assert (state.state, state.status, state.stage) == (QueueState.BLOCKED, Status.HELD, Stage.LAND)
    queue = EstablishmentQueue("clinique", (state,))
    assert queue.pending == []
    assert "affluent onboarding accept clinique --reason" in queue.explain()


def test_an_onboarding_establishment_lands_only_once_its_profile_is_accepted(spark, tmp_path, monkeypatch, capsys):
    from jobs.stages import pipeline
    from jobs.app.cli import main
    from jobs.stages.onboarding import BatchHeld, acceptances
    from jobs.core.settings import Settings

    config = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, config)
    profile = config / "establishments" / f"{EST}.yaml"
    data = yaml.safe_load(profile.read_text(encoding="utf-8"))
    profile.write_text(yaml.safe_dump(dict(data, onboarding=True), allow_unicode=True), encoding="utf-8")
    write_planted_batch(tmp_path / "landing")
    for name, value in {"AFFLUENT_LAKE_ROOT": str(tmp_path / "lake"), "AFFLUENT_LANDING_ROOT": str(tmp_path / "landing"),
                        "AFFLUENT_CONFIG_DIR": str(config), "AFFLUENT_PSEUDONYM_KEY": TEST_KEY}.items():
        monkeypatch.setenv(name, value)
    ctx = pipeline.Context(Settings.from_env())
    ctx.__dict__["spark"] = spark

    for stage in ("ingest", "pseudonymise", "validate"):  # validated and reported as usual
        getattr(pipeline, stage)(ctx, EST, BATCH)
    with pytest.raises(BatchHeld, match=f"onboarding accept {EST}"):
        pipeline.land(ctx, EST, BATCH)
    queue = pipeline.queue(ctx, EST)
    assert queue.blocked_by.status == Status.HELD and queue.pending == []
    # From the command line: the line `affluent batches` shows, a non-zero exit, no traceback.
    from jobs.app.cli import EXIT_STOPPED

    capsys.readouterr()
    assert main(["land", "--establishment", EST, "--batch", BATCH]) == EXIT_STOPPED
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == queue.explain() and "Traceback" not in err
    assert main(["run", "--establishment", EST]) == EXIT_STOPPED
    assert capsys.readouterr().err.strip() == queue.explain()
    assert not (tmp_path / "lake" / "silver" / "patient").exists()  # nothing landed

    assert main(["onboarding", "accept", EST, "--reason", "reports reviewed with the establishment"]) == 0
    out = capsys.readouterr().out
    assert f"batches taken again: {BATCH}" in out
    assert [a["reason"] for a in acceptances(ctx.lake, EST)] == ["reports reviewed with the establishment"]
    assert pipeline.pending(ctx, EST) == [BATCH]
    landed = pipeline.land(ctx, EST, BATCH)
    assert not landed.get("skipped") and landed["landed"]["patient"] == 3
    assert spark.read.format("delta").load(ctx.lake.silver("patient")).count() > 0

    # A profile changed after the acceptance must be accepted again.
    from jobs.stages.onboarding import is_accepted

    assert is_accepted(ctx.lake, ctx.consortium, EST)
    assert not is_accepted(ctx.lake, _onboarding(ctx.consortium, decimal_separator="."), EST)


def test_accepting_an_establishment_that_is_not_onboarding_is_refused(spark, tmp_path, consortium):
    from jobs.core.lake import Lake
    from jobs.stages.onboarding import accept

    with pytest.raises(ValueError, match="is not onboarding"):
        accept(spark, Lake(str(tmp_path / "lake")), consortium, EST, "why not", [])
