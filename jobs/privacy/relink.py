"""Re-link risk of project extracts through their code sets: k^m-anonymity, on its own and across extracts.

Demographics are not the whole story: two extracts that are each k-anonymous
on sex, birth-year band and postal prefix still let a researcher re-link a
person from one to the other by the set of diagnoses or drugs they carry. So
code sets are quasi-identifiers too, as set-valued (transactional) anonymity
treats them (Terrovitis et al., *Privacy-preserving anonymization of
set-valued data*, VLDB 2008). The code columns are diagnosis codes, drug codes
and visit reason codes (which are condition codes: the same kind of item as
a diagnosis, see :data:`CODE_COLUMNS`):

- **k^m-anonymity, in the extract.** For every person, their published
  demographics plus any ``m`` of their codes are shared by at least ``k``
  persons of the extract.
- **Across extracts.** For every person of the extract, the persons of every
  other active project's extract with compatible demographics (equal at the
  coarser of the two generalisations, a suppressed value matching any) and
  the same whole code set (at the coarser of the two code levels) are none or
  at least ``k``, and the same the other way round. A researcher holding both
  extracts then never re-links one person to fewer than ``k``.

Codes are generalised by global recoding, one level for every code of the
extract (:data:`CODE_LEVELS`): ICD-10 codes to their category (``E11``) then
their letter, ATC codes to level 4, 3, 2 then 1; a code of another vocabulary
(DIN, RxNorm, SNOMED CT) has no hierarchy here and is suppressed from level 1.
Then rare items are suppressed (the code value of those rows becomes null;
the rows stay): for each itemset shared by fewer than ``k``, the item of it
with the lowest support in the person's demographic class; for each person
re-linked to fewer than ``k`` of another extract, all of their codes. The
lowest level whose suppressions stay within the declared budget wins; when
none does, the extract is refused (:class:`RelinkRiskExceeded`) and not
published.

Everything is Spark built-ins (itemsets are built with higher-order array
functions, never a UDF); counts and the figures for the manifest reach the
driver, never a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable
from functools import partial

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from jobs.core.tables import cast_to, on_each_table
from jobs.privacy.kanonymity import POSTAL_PREFIX, YEAR_OF_BIRTH

# (ICD-10 characters kept, ATC characters kept); None = the code as in silver.
CODE_LEVELS: tuple[tuple[int | None, int | None], ...] = ((None, None), (3, 5), (3, 4), (3, 3), (1, 1))
CODE_LEVEL_NAMES = ("as in silver", "ICD-10 category, ATC level 4", "ICD-10 category, ATC level 3",
                    "ICD-10 category, ATC level 2", "ICD-10 letter, ATC level 1")
# Passes of item suppression before a level is given up (each pass removes items, so it converges).
MAX_PASSES = 5
ITEM = "_item"
ITEMS = "_items"


@dataclass(frozen=True)
class CodeColumn:
    """A coded column that is a quasi-identifier of the person: its dataset, column and item prefix."""

    dataset: str
    column: str
    kind: str
    # ICD-10 (letter then two digits) or ATC (a letter): the codes with a hierarchy to climb.
    hierarchical: str
    # The standard concept derived from the code (jobs.terminology): a function of it, so never more
    # telling; published at the same level and suppressed with it, or it would give the code back.
    concept: str | None = None


CODE_COLUMNS = (
    CodeColumn("diagnosis", "condition_source_value", "dx", r"^[A-Z][0-9]{2}", "condition_concept_code"),
    CodeColumn("medication", "drug_source_value", "rx", r"^[A-Z]([0-9]{2}.*)?$", "drug_concept_code"),
    # A visit's coded reason is a condition or finding in the diagnosis code systems (Synthea's REASONCODE is
    # the SNOMED CT code of the condition treated): it tells what a diagnosis tells, so it is the same kind of
    # item. A reason equal to one of the person's diagnoses is then one item, not a second one; and a rare
    # diagnosis suppressed in the diagnosis extract is suppressed as a visit reason too, instead of coming
    # back through the encounter extract.
    CodeColumn("encounter", "visit_reason_source_value", "dx", r"^[A-Z][0-9]{2}"),
)


def _kinds(datasets) -> tuple[str, ...]:
    """The item kinds the code columns of ``datasets`` publish, each once."""
    return tuple(dict.fromkeys(c.kind for c in CODE_COLUMNS if c.dataset in datasets))


class RelinkRiskExceeded(Exception):
    """A project's extract cannot meet its declared bound on re-link risk; it is not published."""

    def __init__(self, message: str, outcome=None):
        super().__init__(message)
        self.outcome = outcome  # publish's outcome for the projects that were published, when raised by publish


@dataclass(frozen=True)
class RelinkBound:
    """The declared bound: no person shared by fewer than ``k`` on demographics plus any ``m`` codes."""

    k: int
    m: int
    max_suppressed: float  # share of the extract's (person, code) items that may be suppressed


@dataclass(frozen=True)
class Linkable:
    """What another extract publishes for re-linking: persons' demographics and code sets, and their levels."""

    project_id: str
    persons: DataFrame  # person_id, the quasi-identifiers, _items (sorted array of kind:code)
    quasi_identifiers: tuple[str, ...]
    year_band: int
    postal_characters: int | None
    code_level: int
    kinds: tuple[str, ...]  # the code columns it publishes (``dx``, ``rx``)


@dataclass(frozen=True)
class RelinkOutcome:
    code_level: int
    kept: DataFrame | None  # person_id, _item: the items published (None: the extracts hold no code)
    figures: dict[str, float]


def generalised_code(column: CodeColumn, value: Column, level: int) -> Column:
    """A code at ``level`` of :data:`CODE_LEVELS`; null when its vocabulary has no hierarchy to climb."""
    icd, atc = CODE_LEVELS[level]
    if icd is None or atc is None:
        return value
    clean = F.upper(F.regexp_replace(value, r"[^A-Za-z0-9]", ""))
    keep = icd if column.kind == "dx" else atc
    return F.when(clean.rlike(column.hierarchical), F.substring(clean, 1, keep))


def code_items(frames: dict[str, DataFrame], level: int) -> DataFrame | None:
    """``person_id``, ``_item`` (``kind:code`` at ``level``), one row per distinct item of a person."""
    items = None
    for column in CODE_COLUMNS:
        frame = frames.get(column.dataset)
        if frame is None or column.column not in frame.columns:
            continue
        code = generalised_code(column, F.col(column.column), level)
        part = frame.select("person_id", F.concat(F.lit(f"{column.kind}:"), code).alias(ITEM))
        items = part if items is None else items.unionByName(part)
    return None if items is None else items.where(F.col(ITEM).isNotNull()).distinct()


def itemsets(items: Column, m: int) -> Column:
    """Every subset of 1 to ``m`` items of a sorted, distinct array, each a sorted array (built-ins only)."""
    level = F.transform(items, lambda x: F.array(x))
    out = level
    for _ in range(1, m):
        level = F.flatten(F.transform(level, lambda s: F.transform(
            F.filter(items, lambda x: x > F.element_at(s, -1)), lambda x: F.concat(s, F.array(x)))))
        out = F.concat(out, level)
    return out


def _transactions(demographics: DataFrame, items: DataFrame) -> DataFrame:
    """Persons with their demographics and sorted item arrays (empty when they have no code)."""
    sets = items.groupBy("person_id").agg(F.array_sort(F.collect_set(ITEM)).alias(ITEMS))
    return (demographics.join(sets, on="person_id", how="left")
            .withColumn(ITEMS, F.coalesce(F.col(ITEMS), F.array().cast("array<string>"))))


def _class_keys(qis: list[str]) -> list[Column]:
    """The demographic class of a person; nulls (suppressed values) form their own class, as in k-anonymisation."""
    return [F.coalesce(F.col(q).cast("string"), F.lit("\u0000")).alias(f"_k_{q}") for q in qis]


def _rare_itemsets(persons: DataFrame, qis: list[str], bound: RelinkBound) -> DataFrame:
    """``person_id``, ``_set``: itemsets of at most m codes that, with the person's demographics, fewer than k share."""
    sets = persons.select("person_id", *qis, F.explode(itemsets(F.col(ITEMS), bound.m)).alias("_set"))
    sets = sets.select("person_id", "_set", *_class_keys(qis))
    group = [f"_k_{q}" for q in qis] + ["_set"]
    return (sets.withColumn("_support", F.count("*").over(Window.partitionBy(*group)))
            .where(F.col("_support") < bound.k).select("person_id", "_set", *[f"_k_{q}" for q in qis]))


def _items_to_drop(persons: DataFrame, rare: DataFrame, qis: list[str]) -> DataFrame:
    """For each rare itemset of a person, its item with the lowest support in the person's class."""
    keys = [f"_k_{q}" for q in qis]
    support = (persons.select(*_class_keys(qis), F.explode(ITEMS).alias(ITEM))
               .groupBy(*keys, ITEM).agg(F.count("*").alias("_item_support")))
    candidates = rare.select("person_id", "_set", *keys, F.explode("_set").alias(ITEM))
    return (candidates.join(support, on=[*keys, ITEM], how="left")
            .groupBy("person_id", "_set")
            .agg(F.min_by(ITEM, F.struct(F.coalesce("_item_support", F.lit(0)), F.col(ITEM))).alias(ITEM))
            .select("person_id", ITEM).distinct())


def _common(mine: Linkable, other: Linkable, side: str) -> DataFrame:
    """One extract's persons keyed for comparison with the other: coarser levels of both, non-empty code sets."""
    level = max(mine.code_level, other.code_level)
    kinds = [k for k in mine.kinds if k in other.kinds]
    band = max(mine.year_band, other.year_band)
    chars = [c for c in (mine.postal_characters, other.postal_characters) if c is not None]
    columns = [F.col("person_id").alias(f"{side}_person")]
    for q in sorted(set(mine.quasi_identifiers) & set(other.quasi_identifiers)):
        col = F.col(q)
        if q == YEAR_OF_BIRTH and band > 1:
            col = F.floor(col / F.lit(band)) * F.lit(band)
        elif q == POSTAL_PREFIX and chars:
            col = F.substring(col, 1, min(chars))
        columns.append(col.cast("string").alias(f"{side}_{q}"))
    # Only the code columns both publish can be compared: a set is matched on its part the other can see.
    regeneralised = F.array_sort(F.array_distinct(F.filter(F.transform(F.col(ITEMS), lambda item: _regeneralise(
        item, level, kinds)), lambda x: x.isNotNull())))
    return (mine.persons.select(*columns, regeneralised.alias(f"{side}_set"))
            .where(F.size(f"{side}_set") > 0))


def _regeneralise(item: Column, level: int, kinds: list[str]) -> Column:
    """An item ``kind:code`` published at some level, taken to ``level`` (truncation composes); null if not ``kinds``."""
    kind, code = F.substring_index(item, ":", 1), F.substring_index(item, ":", -1)
    out = F.lit(None).cast("string")
    for column in {c.kind: c for c in CODE_COLUMNS if c.kind in kinds}.values():
        out = F.when(kind == column.kind, F.concat(F.lit(f"{column.kind}:"), generalised_code(
            column, code, level))).otherwise(out)
    return out


def relinked(mine: Linkable, other: Linkable, k: int) -> tuple[DataFrame, DataFrame]:
    """Persons of ``mine`` re-linked to 1 to k-1 persons of ``other`` or the other way round; and their counts.

    Returns the persons of ``mine`` to suppress (``person_id``) and one row of
    figures (``unique``: re-linked to exactly one, ``under_k``: to 1 to k-1).
    """
    a, b = _common(mine, other, "a"), _common(other, mine, "b")
    shared = sorted(set(mine.quasi_identifiers) & set(other.quasi_identifiers))
    compatible = F.lit(True)
    for q in shared:
        compatible = compatible & (F.col(f"a_{q}").isNull() | F.col(f"b_{q}").isNull()
                                   | (F.col(f"a_{q}") == F.col(f"b_{q}")))
    pairs = a.join(b, F.col("a_set") == F.col("b_set"), how="inner").where(compatible).select("a_person", "b_person")
    from_a = pairs.groupBy("a_person").agg(F.count("*").alias("_n"))
    from_b = pairs.groupBy("b_person").agg(F.count("*").alias("_n"))
    risky_a = from_a.where(F.col("_n") < k).select(F.col("a_person").alias("person_id"))
    # A person of the other extract re-linked to fewer than k of ours: ours they link to lose their codes.
    risky_b = (from_b.where(F.col("_n") < k).join(pairs, on="b_person", how="inner")
               .select(F.col("a_person").alias("person_id")))
    figures = from_a.agg(F.count(F.when(F.col("_n") == 1, True)).alias("unique"),
                         F.count(F.when(F.col("_n") < k, True)).alias("under_k"))
    return risky_a.unionByName(risky_b).distinct(), figures


def _rare_count(persons: DataFrame, qis: list[str], bound: RelinkBound) -> int:
    return _rare_itemsets(persons, qis, bound).select("person_id").distinct().count()


def _relinked_counts(me: Linkable, others: list[Linkable], k: int) -> tuple[int, int]:
    unique = under = 0
    for other in others:
        row = relinked(me, other, k)[1].collect()[0]
        unique, under = unique + int(row.unique or 0), under + int(row.under_k or 0)
    return unique, under


def enforce(project_id: str, demographics: DataFrame, qis: list[str], year_band: int, postal_characters: int | None,
            frames: dict[str, DataFrame], others: list[Linkable], bound: RelinkBound) -> RelinkOutcome:
    """The code level and the items to publish so that the extract meets ``bound``; figures before and after.

    ``demographics`` holds one row per person (``person_id`` and the published
    quasi-identifiers ``qis``); ``frames`` the project's code datasets as
    published. Raises :class:`RelinkRiskExceeded` when no level meets the
    bound within the suppression budget.
    """
    def linkable(items: DataFrame, level: int) -> Linkable:
        persons = _transactions(demographics, items).localCheckpoint()
        return Linkable(project_id, persons, tuple(qis), year_band, postal_characters, level, kinds)

    kinds = _kinds(frames)

    original = code_items(frames, 0)
    if original is None:
        return RelinkOutcome(0, None, {"k": bound.k, "m": bound.m, "code_level": 0.0})
    before = linkable(original, 0)
    # The figures before are independent small jobs: side by side, their planning and scheduling overlap.
    figures_of: dict[str, Callable[[], Any]] = {
        "persons": before.persons.count, "items": original.count,
        "rare": partial(_rare_count, before.persons, qis, bound),
        "relinked": partial(_relinked_counts, before, others, bound.k)}
    found = on_each_table(figures_of)
    total_items = found["items"]
    unique, under = found["relinked"]
    figures = {"k": float(bound.k), "m": float(bound.m), "persons": float(found["persons"]),
               "items": float(total_items), "unique_on_m_codes_before": float(found["rare"]),
               "relinked_unique_before": float(unique), "relinked_under_k_before": float(under)}

    best = None
    for level in range(len(CODE_LEVELS)):
        items = code_items(frames, level)
        assert items is not None  # level 0 found codes: every level does
        items = items.localCheckpoint()
        level_total = items.count()
        kept, met = items, False
        for _ in range(MAX_PASSES):
            current = linkable(kept, level)
            rare = _rare_itemsets(current.persons, qis, bound)
            drop = _items_to_drop(current.persons, rare, qis)
            for other in others:
                risky = relinked(current, other, bound.k)[0]
                drop = drop.unionByName(kept.join(risky, on="person_id", how="left_semi").select("person_id", ITEM))
            drop = drop.distinct().localCheckpoint()
            if drop.isEmpty():
                met = True
                break
            kept = kept.join(drop, on=["person_id", ITEM], how="left_anti").localCheckpoint()
            if level_total and (level_total - kept.count()) / level_total > bound.max_suppressed:
                break  # over budget already: the next level, not more passes
        # The budget counts items suppressed at this level; codes without a hierarchy, lost when the level
        # climbs, are a figure of their own.
        published = kept.count()
        share = (level_total - published) / level_total if level_total else 0.0
        if met and share <= bound.max_suppressed:
            best = (level, kept, level_total - published, total_items - level_total if level else 0)
            break
    if best is None:
        raise RelinkRiskExceeded(
            f"project {project_id}: its extract cannot meet its bound on re-link risk (k={bound.k} persons on "
            f"demographics plus any {bound.m} codes, and against every other active extract) with at most "
            f"{bound.max_suppressed:.0%} of its codes suppressed, even at the coarsest code level "
            f"({CODE_LEVEL_NAMES[-1]}). It is not published. Lower relink_risk.k or relink_risk.m, raise "
            "relink_risk.max_suppressed in the project's file, coarsen its quasi-identifiers, or take fewer "
            "code datasets.")
    level, kept, suppressed, without_hierarchy = best
    after = linkable(kept, level)
    figures_of = {"published": kept.count, "rare": partial(_rare_count, after.persons, qis, bound),
                  "relinked": partial(_relinked_counts, after, others, bound.k)}
    found = on_each_table(figures_of)
    unique, under = found["relinked"]
    figures |= {"code_level": float(level), "items_published": float(found["published"]),
                "items_suppressed": float(suppressed),
                "items_without_hierarchy": float(without_hierarchy),
                "unique_on_m_codes_after": float(found["rare"]),
                "relinked_unique_after": float(unique), "relinked_under_k_after": float(under)}
    return RelinkOutcome(level, kept, figures)


def published_codes(frame: DataFrame, dataset: str, outcome: RelinkOutcome) -> DataFrame:
    """A code dataset as published: its code at the level reached, null where the item was suppressed."""
    columns = [c for c in CODE_COLUMNS if c.dataset == dataset and c.column in frame.columns]
    if not columns or outcome.kept is None:
        return frame
    column = columns[0]
    code = generalised_code(column, F.col(column.column), outcome.code_level)
    kept = outcome.kept.select(F.col("person_id").alias("_r_person"), F.col(ITEM).alias("_r_item"),
                               F.lit(True).alias("_r_kept"))
    item = F.concat(F.lit(f"{column.kind}:"), code)
    concept = column.concept if column.concept in frame.columns else None
    published = {column.column: F.col("_r_code")}
    if concept is not None:
        published[concept] = generalised_code(column, F.col(concept), outcome.code_level)
    return (frame.withColumn("_r_code", code).withColumn("_r_item_of_row", item)
            .join(kept, (F.col("person_id") == F.col("_r_person")) & (F.col("_r_item_of_row") == F.col("_r_item")),
                  how="left")
            .select(*[cast_to(F.when(F.col("_r_kept"), published[c]), frame.schema[c].dataType).alias(c)
                      if c in published else F.col(c) for c in frame.columns]))

def declared_bound(consortium, project) -> RelinkBound:
    """The project's bound: its ``relink_risk``, each field it leaves out from ``pipeline.yaml``'s."""
    default, own = consortium.pipeline.relink_risk, project.relink_risk
    return RelinkBound(k=own.k or default.k, m=own.m or default.m,
                       max_suppressed=default.max_suppressed if own.max_suppressed is None else own.max_suppressed)


def demographics_of(patients: DataFrame | None, qis: list[str], frames: dict[str, DataFrame]) -> DataFrame:
    """One row per person of an extract: ``person_id`` and their published quasi-identifiers (null when absent)."""
    from jobs.privacy.kanonymity import _one_value_per_person

    persons = None
    for frame in [*frames.values(), *([patients] if patients is not None else [])]:
        ids = frame.select("person_id")
        persons = ids if persons is None else persons.unionByName(ids)
    if persons is None:
        raise ValueError("no extract to take the persons from: pass the patient extract or a coded one")
    persons = persons.distinct()
    if patients is None or not qis:
        return persons
    return persons.join(_one_value_per_person(patients, qis), on="person_id", how="left")


def published_linkable(spark, lake, project, manifest: str) -> Linkable | None:
    """Another active project's extract as it is published now (None when it has no code dataset on disk)."""
    from jobs.core.tables import table_exists

    def read(dataset: str) -> DataFrame | None:
        path = lake.project(project.id, dataset)
        return spark.read.format("delta").load(path) if table_exists(spark, path) else None

    # Only extracts that publish their code column: a kind claimed without its codes would compare sets
    # on items one side does not carry, and so miss re-links.
    frames = {c.dataset: f for c in CODE_COLUMNS if (f := read(c.dataset)) is not None and c.column in f.columns}
    items = code_items(frames, 0)  # published codes, already at the project's level
    if items is None:
        return None
    patients = read("patient")
    qis = [q for q in project.quasi_identifiers if patients is not None and q in patients.columns]
    latest = read(manifest)
    row = latest.orderBy(F.col("published_at").desc()).first() if latest is not None else None
    anonymity = (row.asDict().get("k_anonymity") if row else None) or {}
    relink = (row.asDict().get("relink_risk") if row else None) or {}
    postal = anonymity.get("postal_characters", -1)
    persons = _transactions(demographics_of(patients, qis, frames), items).localCheckpoint()
    return Linkable(project.id, persons, tuple(qis), int(anonymity.get("year_band", 1)),
                    None if postal is None or postal < 0 else int(postal), int(relink.get("code_level", 0)),
                    _kinds(frames))


def enforce_relink_bound(spark, lake, consortium, project, extracts: dict[str, DataFrame], anonymity,
                         others: list, manifest: str) -> RelinkOutcome:
    """Publish's entry: the project's code datasets held to its declared bound, against ``others``' extracts.

    ``extracts`` are the project's datasets as they will be published (the
    patient one k-anonymised, ``anonymity`` what that did); ``others`` the
    other active projects, whose extracts are read as published now.
    """
    bound = declared_bound(consortium, project)
    # Only the person and the code are read, many times over: computed once, each dataset's side by side.
    frames = on_each_table({c.dataset: extracts[c.dataset].select("person_id", c.column).localCheckpoint
                            for c in CODE_COLUMNS
                            if c.dataset in extracts and c.column in extracts[c.dataset].columns})
    if not frames:
        return RelinkOutcome(0, None, {"k": float(bound.k), "m": float(bound.m), "code_level": 0.0})
    qis = list(anonymity.quasi_identifiers) if anonymity is not None else []
    # The persons' demographics come from the k-anonymised patient extract (silver, consent, the
    # k-anonymity decision): computed once, not again for each level and pass.
    demographics = demographics_of(extracts.get("patient"), qis, frames).localCheckpoint()
    # The other projects' published extracts, read side by side.
    read = on_each_table({other.id: partial(published_linkable, spark, lake, other, manifest) for other in others})
    linkables = [found for found in read.values() if found is not None]
    return enforce(project.id, demographics, qis, anonymity.year_band if anonymity is not None else 1,
                   anonymity.postal_characters if anonymity is not None else None, frames, linkables, bound)
