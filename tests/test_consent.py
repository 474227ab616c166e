"""Consent registry: the state per person and purpose, recomputed independently in plain Python."""

from __future__ import annotations

import datetime as dt

import pytest

from jobs.privacy.consent import consented_persons, current_consent
from jobs.core.schemas import SILVER_SCHEMAS
from tests.terminology_helpers import source_schema

D = dt.date
A, B = "chu_laurentides", "hopital_riviere"
GEN, ONC = "research_general", "research_oncology"
EXTRACTED = dt.datetime(2026, 1, 1)

# (person, establishment, purpose, decision, decision_date, valid_from, valid_until)
HISTORY = [
    ("p01", A, GEN, "permit", D(2025, 1, 1), None, None),
    ("p01", B, GEN, "withdraw", D(2026, 2, 1), None, None),        # withdrawal elsewhere applies everywhere
    ("p02", A, ONC, "permit", D(2025, 1, 1), None, D(2025, 12, 31)),  # expires
    ("p03", A, ONC, "permit", D(2026, 1, 10), None, None),
    ("p03", B, ONC, "deny", D(2026, 1, 10), None, None),            # same day: the refusal wins
    ("p03", B, GEN, "deny", D(2025, 5, 1), None, None),
    ("p03", A, GEN, "permit", D(2026, 3, 1), None, None),           # later permit wins
    ("p04", A, ONC, "deny", D(2025, 1, 1), None, None),
    ("p04", B, ONC, "permit", D(2026, 1, 1), D(2026, 7, 1), None),  # not valid yet: the deny stands
    ("p05", B, None, "withdraw", D(2026, 1, 15), None, None),       # no purpose: every purpose
    ("p05", A, ONC, "permit", D(2025, 1, 1), None, None),
    ("p05", A, GEN, "permit", D(2025, 1, 1), None, None),
    ("p06", A, ONC, "permit", D(2026, 9, 1), None, None),           # decided in the future
    ("p07", B, ONC, "withdraw", None, None, None),                  # undated refusal still counts
    ("p07", A, ONC, "permit", D(2026, 1, 1), None, None),
    ("p09", A, GEN, "deny", D(2025, 6, 1), None, D(2025, 12, 31)),  # a refusal never lapses
    ("p10", A, ONC, "permit", D(2025, 1, 1), None, None),
    ("p10", B, ONC, "permit", D(2026, 2, 1), None, D(2026, 3, 1)),  # expired permit: as if never given
    ("p11", A, GEN, "permit", D(2025, 1, 1), None, None),           # not in silver.patient
]
PATIENTS = [f"p{i:02d}" for i in range(1, 11)]
DATES = [D(2025, 6, 15), D(2026, 6, 1), D(2026, 10, 1)]


def expected_allowed(history, patients, purpose, regime, on):
    """The consent rules of DESIGN.md, written again without Spark."""
    allowed = set()
    for person in patients:
        counting = []
        for p, _est, purp, decision, when, vfrom, vuntil in history:
            if p != person:
                continue
            permit = decision == "permit"
            if purp != purpose and not (purp is None and not permit):
                continue
            if permit:
                if when is None or when > on:
                    continue
                if (vfrom and vfrom > on) or (vuntil and vuntil < on):
                    continue
            elif when is not None and when > on:
                continue
            counting.append((when or D.max, 0 if not permit else 1, permit))
        if not counting:
            ok = regime == "opt_out"
        else:
            latest = max(when for when, _, _ in counting)
            same_day = [c for c in counting if c[0] == latest]
            ok = all(permit for _, _, permit in same_day)
        if ok:
            allowed.add(person)
    return allowed


@pytest.fixture(scope="module")
def frames(spark):
    patient = spark.createDataFrame(
        [(p, A, f"key-{p}", "nam", "female", 1980, 1, "H2X", False, "b1", EXTRACTED) for p in PATIENTS],
        source_schema("patient"))
    consent = spark.createDataFrame(
        [(f"c{i}", p, est, purp, dec, when, vf, vu, "b1", EXTRACTED)
         for i, (p, est, purp, dec, when, vf, vu) in enumerate(HISTORY)],
        SILVER_SCHEMAS["consent"])
    return patient, consent


def _persons(spark, frames, purpose, regime, on):
    patient, consent = frames
    return {r.person_id for r in consented_persons(spark, patient, consent, purpose, regime, on).collect()}


def test_rules_on_named_cases(spark, frames):
    assert _persons(spark, frames, GEN, "opt_out", D(2026, 6, 1)) == {"p02", "p03", "p04", "p06", "p07", "p08", "p10"}
    assert _persons(spark, frames, ONC, "opt_in", D(2026, 6, 1)) == {"p10"}
    assert _persons(spark, frames, ONC, "opt_in", D(2026, 10, 1)) == {"p04", "p06", "p10"}
    assert _persons(spark, frames, ONC, "opt_in", D(2025, 6, 15)) == {"p02", "p05", "p10"}


@pytest.mark.parametrize("on", DATES)
def test_matches_independent_computation(spark, frames, on):
    for purpose in (GEN, ONC):
        for regime in ("opt_in", "opt_out"):
            got = _persons(spark, frames, purpose, regime, on)
            assert got == expected_allowed(HISTORY, PATIENTS, purpose, regime, on), (purpose, regime, on)
            assert "p11" not in got


def test_current_consent_shows_the_winning_decision(spark, frames):
    _, consent = frames
    rows = {(r.person_id, r.purpose): r for r in current_consent(spark, consent, D(2026, 6, 1), [GEN, ONC]).collect()}
    assert rows[("p03", ONC)].decision == "deny" and not rows[("p03", ONC)].permits
    assert rows[("p01", GEN)].decision == "withdraw" and rows[("p01", GEN)].establishment_id == B
    assert rows[("p05", ONC)].decision == "withdraw" and rows[("p05", GEN)].decision == "withdraw"
    assert ("p08", GEN) not in rows
    assert ("p06", ONC) not in rows  # decided after the date


def test_unknown_regime_is_refused(spark, frames):
    patient, consent = frames
    with pytest.raises(ValueError, match="regime"):
        consented_persons(spark, patient, consent, GEN, "opt_sideways", D(2026, 1, 1))
