"""Re-link risk through code sets: generalisation, k^m-anonymity, and linkage against another extract."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from jobs.privacy.relink import (CODE_COLUMNS, ITEM, ITEMS, Linkable, RelinkBound, RelinkRiskExceeded, enforce,
                         generalised_code, itemsets, published_codes, relinked)

DX, RX = CODE_COLUMNS[:2]  # diagnoses and drugs (visit reasons generalise as diagnoses)


def test_codes_climb_their_hierarchy_and_others_are_suppressed(spark):
    rows = [("E11.9", "dx"), ("C50.912", "dx"), ("A10BA02", "rx"), ("02242974", "rx"), ("248153007", "dx")]
    df = spark.createDataFrame(rows, "code string, kind string")
    out = {}
    for level in range(5):
        code = F.col("code")
        g = F.when(F.col("kind") == "dx", generalised_code(DX, code, level)).otherwise(generalised_code(RX, code, level))
        out[level] = [r.g for r in df.select(g.alias("g")).collect()]
    assert out[0] == ["E11.9", "C50.912", "A10BA02", "02242974", "248153007"]
    assert out[1] == ["E11", "C50", "A10BA", None, None]  # a DIN or SNOMED CT code has no hierarchy here
    assert out[2] == ["E11", "C50", "A10B", None, None]
    assert out[3] == ["E11", "C50", "A10", None, None]
    assert out[4] == ["E", "C", "A", None, None]


def test_itemsets_are_every_subset_of_at_most_m_items(spark):
    df = spark.createDataFrame([(["a", "b", "c"],), ([],), (["x"],)], "items array<string>")
    got = [sorted(map(tuple, r.s)) for r in df.select(itemsets(F.col("items"), 2).alias("s")).collect()]
    assert got == [[("a",), ("a", "b"), ("a", "c"), ("b",), ("b", "c"), ("c",)], [], [("x",)]]
    three = df.select(F.size(itemsets(F.col("items"), 3)).alias("n")).collect()
    assert [r.n for r in three] == [7, 0, 1]


def _people(spark, rows):
    """(person, sex, year, [codes]) → demographics and a diagnosis extract."""
    demo = spark.createDataFrame([(p, s, y) for p, s, y, _ in rows], "person_id string, sex string, year int")
    dx = spark.createDataFrame([(p, c) for p, _, _, codes in rows for c in codes],
                               "person_id string, condition_source_value string")
    return demo, dx


def _unique_on_m(demo, dx, k, m, level=0):
    """Independent check: persons with an itemset of at most m published codes that fewer than k share."""
    from collections import Counter
    from itertools import combinations

    sets = {}
    for r in dx.collect():
        if r.condition_source_value is not None:
            sets.setdefault(r.person_id, set()).add(r.condition_source_value)
    who = {r.person_id: (r.sex, r.year) for r in demo.collect()}
    support = Counter()
    keys = {}
    for p, codes in sets.items():
        keys[p] = [(who[p], c) for n in range(1, m + 1) for c in combinations(sorted(codes), n)]
        support.update(keys[p])
    return {p for p, ks in keys.items() if any(support[x] < k for x in ks)}


def test_rare_codes_are_suppressed_until_no_person_is_unique_on_m_codes(spark):
    rows = [(f"p{i}", "F", 1960, ["E11.9", "I10"]) for i in range(6)]
    rows += [("p6", "F", 1960, ["E11.9", "C50.9"]), ("p7", "F", 1960, ["E11.9", "I10", "J45.9"])]
    demo, dx = _people(spark, rows)
    bound = RelinkBound(k=3, m=2, max_suppressed=0.2)
    assert _unique_on_m(demo, dx, 3, 2) == {"p6", "p7"}
    outcome = enforce("p", demo, ["sex", "year"], 1, None, {"diagnosis": dx}, [], bound)
    published = published_codes(dx, "diagnosis", outcome)
    assert published.count() == dx.count()  # rows stay; suppressed codes become null
    assert _unique_on_m(demo, published, 3, 2) == set()
    f = outcome.figures
    assert f["unique_on_m_codes_before"] == 2 and f["unique_on_m_codes_after"] == 0
    assert f["code_level"] == 0 and f["items_suppressed"] == 2  # C50.9 and J45.9, the rare ones
    kept = {r.condition_source_value for r in published.where(F.col("person_id") == "p6").collect()}
    assert kept == {"E11.9", None}


def test_a_bound_that_cannot_be_met_is_refused_with_its_reason(spark):
    rows = [(f"p{i}", "F", 1960, [f"C{i:02d}.1"]) for i in range(6)]  # every code is rare at every level
    demo, dx = _people(spark, rows)
    with pytest.raises(RelinkRiskExceeded, match="project tiny: its extract cannot meet its bound.*k=10"):
        enforce("tiny", demo, ["sex", "year"], 1, None, {"diagnosis": dx}, [], RelinkBound(10, 2, 0.1))


def _linkable(spark, project_id, rows, level=0):
    persons = spark.createDataFrame([(p, s, y, sorted(f"dx:{c}" for c in codes)) for p, s, y, codes in rows],
                                    f"person_id string, sex string, year int, {ITEMS} array<string>")
    return Linkable(project_id, persons, ("sex", "year"), 1, None, level, ("dx",))


def test_a_person_unique_across_two_extracts_loses_the_codes_that_re_link_them(spark):
    # Both extracts: k-anonymous on demographics, k^1 on codes (each code shared by 3), but one person's
    # whole set is unique in both.
    common = [(f"a{i}", "F", 1960, ["E11.9", "I10"]) for i in range(3)] + \
             [(f"b{i}", "F", 1960, ["E11.9"]) for i in range(3)]
    mine = common + [("x", "F", 1960, ["E11.9", "I10", "J45.9"])] + [(f"c{i}", "F", 1960, ["J45.9"]) for i in range(2)]
    theirs = [(f"o-{p}", s, y, c) for p, s, y, c in mine]
    other = _linkable(spark, "other", theirs)
    me = _linkable(spark, "me", mine)
    risky, figures = relinked(me, other, 3)
    row = figures.first()
    assert row.unique >= 1 and {r.person_id for r in risky.collect()} >= {"x"}
    demo, dx = _people(spark, mine)
    outcome = enforce("me", demo, ["sex", "year"], 1, None, {"diagnosis": dx}, [other], RelinkBound(3, 1, 0.5))
    f = outcome.figures
    assert f["relinked_unique_before"] >= 1 and f["relinked_unique_after"] == 0 and f["relinked_under_k_after"] == 0
    kept = {r[ITEM] for r in outcome.kept.where(F.col("person_id") == "x").collect()}
    assert kept != {"dx:E11.9", "dx:I10", "dx:J45.9"}


def test_a_code_s_standard_concept_is_published_and_suppressed_with_it(spark):
    """The concept derived from a code would give a suppressed code back: it follows the code's fate."""
    rows = [(f"p{i}", "F", 1960, ["E11.9", "I10"]) for i in range(6)] + [("p6", "F", 1960, ["E11.9", "C50.9"])]
    demo, dx = _people(spark, rows)
    dx = dx.withColumn("condition_concept_code", F.substring("condition_source_value", 1, 3))
    outcome = enforce("p", demo, ["sex", "year"], 1, None, {"diagnosis": dx}, [], RelinkBound(3, 2, 0.2))
    published = published_codes(dx, "diagnosis", outcome)
    pairs = {(r.condition_source_value, r.condition_concept_code)
             for r in published.where(F.col("person_id") == "p6").collect()}
    assert pairs == {("E11.9", "E11"), (None, None)}  # C50.9 suppressed, and its category C50 with it
