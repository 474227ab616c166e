"""The consent registry: who allows what, on a given date.

``silver.consent`` keeps every decision an establishment sent (one row per
decision, never updated in place), so the state at any date can be recomputed
and explained. The rules, applied per person and purpose:

- only decisions taken on or before the date count (a decision dated later has
  not happened yet);
- a ``permit`` counts only inside its validity window (``valid_from`` and
  ``valid_until`` inclusive, a null bound is open); outside it, it is as if it
  had never been given, and the previous decision stands;
- a ``deny`` or ``withdraw`` counts from its decision date whatever its
  validity window: a refusal is never allowed to lapse silently (fail closed);
- the most recent decision across establishments wins, so a withdrawal sent by
  one establishment applies everywhere; on the same day a refusal beats a
  permit (fail closed);
- a refusal without a purpose applies to every purpose; a permit without a
  purpose allows nothing; any decision value other than ``permit`` is a refusal;
- without any decision that counts, the purpose's regime decides: ``opt_in``
  means no, ``opt_out`` means yes.

Example::

    allowed = consented_persons(spark, patients, consents, "research_oncology", "opt_in",
                                dt.date(2026, 6, 1))
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from jobs.core.config import REGIME_OPT_IN, REGIME_OPT_OUT

DECISION_PERMIT = "permit"
DECISION_DENY = "deny"
DECISION_WITHDRAW = "withdraw"

CURRENT_CONSENT_COLUMNS = ("person_id", "purpose", "decision", "decision_date", "establishment_id",
                           "consent_id", "permits")


class UnknownRegimeError(ValueError):
    """A purpose's consent regime is neither opt_in nor opt_out."""


def _is_permit(decision: Column) -> Column:
    return F.coalesce(decision == F.lit(DECISION_PERMIT), F.lit(False))


def _within_validity(on_date: dt.date) -> Column:
    day = F.lit(on_date)
    return (F.coalesce(F.col("valid_from") <= day, F.lit(True))
            & F.coalesce(F.col("valid_until") >= day, F.lit(True)))


def decisions_in_force(silver_consent: DataFrame, on_date: dt.date, purposes: Iterable[str]) -> DataFrame:
    """Decisions that count on ``on_date`` for ``purposes``, one row per decision and purpose.

    A refusal without a purpose is repeated for every purpose asked about.
    """
    purposes = list(purposes)
    permit = _is_permit(F.col("decision"))
    counts = (
        F.col("person_id").isNotNull()
        & F.coalesce(F.col("decision_date") <= F.lit(on_date), ~permit)  # an undated refusal still counts
        & (~permit | (F.col("decision_date").isNotNull() & _within_validity(on_date)))
    )
    wanted = F.array(*[F.lit(p) for p in purposes]) if purposes else F.array().cast("array<string>")
    applies_to = (
        F.when(F.col("purpose").isNotNull(), F.array(F.col("purpose")))
        .when(~permit, wanted)
        .otherwise(F.array().cast("array<string>"))
    )
    return (
        silver_consent.where(counts)
        .select("person_id", F.explode(applies_to).alias("purpose"), "decision", "decision_date",
                "establishment_id", "consent_id", permit.alias("permits"))
        .where(F.col("purpose").isin(purposes))
    )


def current_consent(spark: SparkSession, silver_consent: DataFrame, on_date: dt.date,
                    purposes: Iterable[str]) -> DataFrame:
    """The decision in force per person and purpose on ``on_date`` (persons with none are absent).

    Columns: ``person_id, purpose, decision, decision_date, establishment_id,
    consent_id, permits`` (``permits`` is true only for a permit in force).
    """
    latest_first = Window.partitionBy("person_id", "purpose").orderBy(
        F.col("decision_date").desc_nulls_first(),
        F.col("permits").asc(),  # same day: the refusal first
        F.col("establishment_id").asc(), F.col("consent_id").asc(),
    )
    return (
        decisions_in_force(silver_consent, on_date, purposes)
        .withColumn("_rank", F.row_number().over(latest_first))
        .where(F.col("_rank") == 1)
        .select(*CURRENT_CONSENT_COLUMNS)
    )


def consent_status(spark: SparkSession, silver_patient: DataFrame, silver_consent: DataFrame,
                   purpose: str, regime: str, on_date: dt.date) -> DataFrame:
    """Every person known in ``silver.patient`` with the decision in force and whether it allows ``purpose``.

    Columns: ``person_id, purpose, decision, decision_date, allowed``.
    """
    if regime not in (REGIME_OPT_IN, REGIME_OPT_OUT):
        raise UnknownRegimeError(f"regime {regime!r} of purpose {purpose!r} must be "
                                 f"{REGIME_OPT_IN!r} or {REGIME_OPT_OUT!r}; fix purposes.yaml")
    persons = silver_patient.where(F.col("person_id").isNotNull()).select("person_id").distinct()
    current = current_consent(spark, silver_consent, on_date, [purpose])
    default = F.lit(regime == REGIME_OPT_OUT)
    return (
        persons.join(current, on="person_id", how="left")
        .select(
            "person_id",
            F.lit(purpose).alias("purpose"),
            "decision",
            "decision_date",
            F.coalesce(F.col("permits"), default).alias("allowed"),
        )
    )


def consented_persons(spark: SparkSession, silver_patient: DataFrame, silver_consent: DataFrame,
                      purpose: str, regime: str, on_date: dt.date) -> DataFrame:
    """Persons of ``silver.patient`` whose consent allows ``purpose`` on ``on_date`` (``person_id`` only)."""
    return (
        consent_status(spark, silver_patient, silver_consent, purpose, regime, on_date)
        .where(F.col("allowed"))
        .select("person_id")
    )
