"""k-anonymity of project extracts on their quasi-identifiers, and a re-identification risk figure.

Publishing generalises, then suppresses, the project's ``quasi_identifiers``
in its ``patient`` extract until every equivalence class (persons sharing the
same published values) holds at least ``k_anonymity`` persons.

Generalisation is global recoding along one ladder of levels, the same for
every person of the extract:

====  ==========================  ===========================
level ``year_of_birth``           ``postal_prefix``
====  ==========================  ===========================
0     exact                       as in silver (FSA / département)
1     5-year band                 as in silver
2     5-year band                 first character
3     10-year band                first character
4     10-year band                suppressed (null)
====  ==========================  ===========================

A band is published as its first year (``1955`` for 1955–1959), so the
column keeps its type; the manifest tells the band width. ``month_of_birth``,
when it is a quasi-identifier, is dropped from level 1. Sex and any other
quasi-identifier are kept as they are.

The level chosen is the lowest one at which the persons left in classes
smaller than k are at most :data:`SUPPRESSION_BUDGET` of the extract; when no
level meets the budget, the level that leaves the fewest such persons. Those
persons then have every quasi-identifier suppressed (null): they stay in
the extract (their clinical rows are the research data) but form one class,
"suppressed". When that class would itself hold fewer than k persons, the
smallest other classes join it until it holds k, so every class, the
suppressed one included, holds at least k persons (unless the extract has
fewer than k persons, when all of them are suppressed).

A person seen at several establishments has one row per establishment; a
quasi-identifier on which those rows disagree is null for that person, so
all of a person's rows fall in one class.

Everything is Spark built-ins; only one count per level and the figures for
the manifest (aggregates) reach the driver.

Risk: demographics alone are not the whole story. Of 26 persons of one
project, 14 were unique on (sex, year of birth, set of diagnosis codes) and
matched one person of another project. :func:`reidentification_risk`
reports the share of persons unique on the published quasi-identifiers, and
on them plus the person's set of diagnosis codes when the project takes
diagnoses; the second figure is what a linkage attack on clinical content
would reach.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from jobs.core.tables import cast_to

YEAR_OF_BIRTH = "year_of_birth"
MONTH_OF_BIRTH = "month_of_birth"
POSTAL_PREFIX = "postal_prefix"
SUPPRESSION_BUDGET = 0.05
# (year band width, postal prefix characters kept; 0 = suppressed, None = as in silver)
LEVELS: tuple[tuple[int, int | None], ...] = ((1, None), (5, None), (5, 1), (10, 1), (10, 0))
_CLASS_SIZE = "_class_persons"
_SUPPRESSED = "_suppressed"


@dataclass(frozen=True)
class KAnonymity:
    """What k-anonymisation did to one extract (recorded in its manifest)."""

    k: int
    quasi_identifiers: tuple[str, ...]
    level: int
    year_band: int
    postal_characters: int | None
    persons: int
    generalised: int
    suppressed: int
    smallest_class: int

    def figures(self) -> dict[str, int]:
        return {"k": self.k, "level": self.level, "year_band": self.year_band,
                "postal_characters": -1 if self.postal_characters is None else self.postal_characters,
                "persons": self.persons, "generalised": self.generalised, "suppressed": self.suppressed,
                "smallest_class": self.smallest_class}


def generalised(column: str, level: int) -> Column:
    """``column`` at ``level`` of the ladder (unchanged when the ladder does not coarsen it)."""
    band, postal = LEVELS[level]
    col = F.col(column)
    if column == YEAR_OF_BIRTH and band > 1:
        return (F.floor(col / F.lit(band)) * F.lit(band)).cast("int")
    if column == MONTH_OF_BIRTH and level > 0:
        return F.lit(None).cast("int")
    if column == POSTAL_PREFIX and postal is not None:
        return F.substring(col, 1, postal) if postal > 0 else F.lit(None).cast("string")
    return col


def _one_value_per_person(patients: DataFrame, qis: list[str]) -> DataFrame:
    return patients.groupBy("person_id").agg(*[
        F.when(F.min(q).eqNullSafe(F.max(q)), F.min(q)).alias(q) for q in qis])


def _at_level(persons: DataFrame, qis: list[str], level: int) -> DataFrame:
    return persons.select("person_id", *[cast_to(generalised(q, level), persons.schema[q].dataType).alias(q)
                                         for q in qis])


def _small_persons(persons: DataFrame, qis: list[str], k: int) -> int:
    classes = persons.groupBy(*qis).agg(F.count("*").alias(_CLASS_SIZE))
    return int(classes.agg(F.sum(F.when(F.col(_CLASS_SIZE) < k, F.col(_CLASS_SIZE)).otherwise(0))).collect()[0][0] or 0)


def _choose_level(persons: DataFrame, qis: list[str], k: int, total: int) -> int:
    small = [_small_persons(_at_level(persons, qis, level), qis, k) for level in range(len(LEVELS))]
    for level, count in enumerate(small):
        if count <= SUPPRESSION_BUDGET * total:
            return level
    return min(range(len(LEVELS)), key=lambda level: (small[level], level))


def k_anonymise(patients: DataFrame, quasi_identifiers: list[str], k: int) -> tuple[DataFrame, KAnonymity]:
    """The patient extract with its quasi-identifiers generalised then suppressed to ``k``; and what was done.

    ``patients`` is the extract as published (project pseudonyms in
    ``person_id``); quasi-identifiers it does not carry are ignored. Its
    columns and their order are kept.
    """
    qis = [q for q in quasi_identifiers if q in patients.columns and q != "person_id"]
    original = _one_value_per_person(patients, qis).localCheckpoint()
    total = original.count()
    if not qis or total == 0:
        return patients, KAnonymity(k, tuple(qis), 0, 1, None, total, 0, 0, total)
    level = _choose_level(original, qis, k, total)
    persons = _at_level(original, qis, level).withColumn(
        _CLASS_SIZE, F.count("*").over(Window.partitionBy(*qis)))
    persons = persons.withColumn(_SUPPRESSED, F.col(_CLASS_SIZE) < k).localCheckpoint()
    suppressed = persons.where(F.col(_SUPPRESSED)).count()
    if 0 < suppressed < k:
        # The suppressed persons form one class too: top it up to k with the smallest other classes, whole.
        classes = (persons.where(~F.col(_SUPPRESSED)).groupBy(*qis).agg(F.count("*").alias(_CLASS_SIZE))
                   .withColumn("_before", F.sum(_CLASS_SIZE).over(
                       Window.orderBy(_CLASS_SIZE, *qis).rowsBetween(Window.unboundedPreceding, -1))))
        joining = classes.where(F.coalesce(F.col("_before"), F.lit(0)) < F.lit(k - suppressed)).select(*qis)
        persons = _mark_joining(persons, joining, qis).localCheckpoint()
        suppressed = persons.where(F.col(_SUPPRESSED)).count()
    # Every column of the decision is renamed: ``persons`` derives from ``patients``, and a join of
    # two plans sharing attributes is refused when Spark plans without adaptive execution.
    decided = persons.select(F.col("person_id").alias("_k_person"), F.col(_SUPPRESSED).alias(_SUPPRESSED),
                             *[F.col(q).alias(f"_g_{q}") for q in qis])
    out = patients.join(decided, F.col("person_id") == F.col("_k_person"), how="left").select(*[
        cast_to(F.when(F.col(_SUPPRESSED), F.lit(None)).otherwise(F.col(f"_g_{c}")), patients.schema[c].dataType).alias(c)
        if c in qis else F.col(c) for c in patients.columns])
    # Every person left with quasi-identifiers has them at the level reached.
    generalised_persons = total - suppressed if level > 0 else 0
    published = persons.select(*[F.when(F.col(_SUPPRESSED), F.lit(None)).otherwise(F.col(q)).alias(q) for q in qis])
    smallest = published.groupBy(*qis).count().agg(F.min("count")).collect()[0][0]
    band, postal = LEVELS[level]
    return out, KAnonymity(k, tuple(qis), level, band, postal, total, generalised_persons, suppressed,
                           int(smallest or 0))


def _mark_joining(persons: DataFrame, joining: DataFrame, qis: list[str]) -> DataFrame:
    """Persons of the classes in ``joining`` are suppressed too."""
    flagged = joining.withColumn("_joins", F.lit(True))
    p, j = persons.alias("p"), flagged.alias("j")
    condition = F.lit(True)
    for q in qis:
        condition = condition & F.col(f"p.{q}").eqNullSafe(F.col(f"j.{q}"))
    return (p.join(j, condition, "left")
            .select(*[F.col(f"p.{c}") for c in persons.columns if c != _SUPPRESSED],
                    (F.col(f"p.{_SUPPRESSED}") | F.coalesce(F.col("j._joins"), F.lit(False))).alias(_SUPPRESSED)))


def reidentification_risk(patients: DataFrame, quasi_identifiers: list[str],
                          diagnosis: DataFrame | None) -> dict[str, float]:
    """Share of persons unique on the published quasi-identifiers, and on them plus their set of diagnosis codes.

    ``unique_with_diagnoses`` is present only when ``diagnosis`` (the
    project's diagnosis extract, with ``condition_source_value``) is given.
    """
    qis = [q for q in quasi_identifiers if q in patients.columns and q != "person_id"]
    persons = _one_value_per_person(patients, qis)
    total = persons.count()
    if total == 0:
        return {"persons": 0.0, "unique_on_quasi_identifiers": 0.0}

    def unique_share(frame: DataFrame, columns: list[str]) -> float:
        if not columns:
            return 1.0 if total == 1 else 0.0
        classes = frame.groupBy(*columns).agg(F.count("*").alias(_CLASS_SIZE))
        return float(classes.where(F.col(_CLASS_SIZE) == 1).count()) / total

    risk = {"persons": float(total), "unique_on_quasi_identifiers": unique_share(persons, qis)}
    if diagnosis is not None and "condition_source_value" in diagnosis.columns:
        codes = diagnosis.groupBy("person_id").agg(
            F.array_sort(F.collect_set("condition_source_value")).alias("_codes"))
        clinical = (persons.join(codes, on="person_id", how="left")
                    .withColumn("_codes", F.coalesce("_codes", F.array().cast("array<string>"))))
        risk["unique_with_diagnoses"] = unique_share(clinical, [*qis, "_codes"])
    return risk
