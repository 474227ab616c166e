"""k-anonymity of the patient extract (jobs.privacy.kanonymity) on tiny inline frames."""

from __future__ import annotations

from collections import Counter

import pytest

from jobs.privacy.kanonymity import k_anonymise, reidentification_risk

QIS = ["year_of_birth", "gender_source_value", "postal_prefix"]
SCHEMA = "person_id string, gender_source_value string, year_of_birth int, postal_prefix string"


def classes(rows, qis=QIS) -> Counter:
    """Persons per class of published quasi-identifiers (suppressed persons are the all-null class)."""
    per_person = {r["person_id"]: tuple(r[q] for q in qis) for r in rows}
    return Counter(per_person.values())


def population():
    """26 persons: two classes of 10 after 5-year bands, one of 5, and one outlier."""
    rows = [(f"f{i}", "F", 1960 + i % 5, "H2X") for i in range(10)]
    rows += [(f"m{i}", "M", 1965 + i % 5, "G1R") for i in range(10)]
    rows += [(f"g{i}", "F", 1970 + i, "H2X") for i in range(5)]
    rows += [("old", "M", 1931, "J0K")]
    return rows


def test_already_anonymous_extract_is_left_as_it_is(spark):
    rows = [(f"p{i}", "F", 1960, "H2X") for i in range(6)]
    out, report = k_anonymise(spark.createDataFrame(rows, SCHEMA), QIS, 5)
    assert sorted(tuple(r) for r in out.collect()) == sorted(rows)
    assert (report.level, report.generalised, report.suppressed, report.smallest_class) == (0, 0, 0, 6)


def test_generalise_then_suppress_to_k(spark):
    frame = spark.createDataFrame(population(), SCHEMA)
    out, report = k_anonymise(frame, QIS, 5)
    published = [r.asDict() for r in out.collect()]
    assert out.columns == frame.columns and len(published) == 26  # nobody removed
    sizes = classes(published)
    assert min(sizes.values()) >= 5, sizes
    # Level 1 (5-year bands) leaves only the 1931 outlier alone: 1/26 is within the suppression budget.
    assert report.level == 1 and report.year_band == 5
    # The outlier alone would be a suppressed class of one: the smallest class (5 persons) joins it.
    assert report.suppressed == 6
    assert sizes[(None, None, None)] == 6
    assert report.generalised == 20
    assert report.smallest_class == 6
    assert sizes[(1960, "F", "H2X")] == 10 and sizes[(1965, "M", "G1R")] == 10


@pytest.mark.parametrize("adaptive", ["true", "false"])
def test_the_same_extract_with_and_without_adaptive_execution(spark, adaptive):
    """The suite plans without adaptive execution, production with it: the same decision either way.

    (The conflict a join of the extract with its own decision once caused without adaptive
    execution needs publish's whole extract plan; tests/test_publish.py goes through it.)
    """
    from jobs.privacy.crypto import SparkKey, hmac_sha256_hex

    # As publish builds it: the project pseudonym computed in the plan (the key's pads are subqueries).
    frame = spark.createDataFrame(population(), SCHEMA)
    extract = frame.select(hmac_sha256_hex(SparkKey(spark, b"k" * 32), "person_id").alias("person_id"),
                           *[c for c in frame.columns if c != "person_id"])
    before = spark.conf.get("spark.sql.adaptive.enabled")
    spark.conf.set("spark.sql.adaptive.enabled", adaptive)
    try:
        out, report = k_anonymise(extract, QIS, 5)
        sizes = classes([r.asDict() for r in out.collect()])
    finally:
        spark.conf.set("spark.sql.adaptive.enabled", before)
    assert (report.level, report.suppressed, report.smallest_class) == (1, 6, 6)
    assert sizes[(None, None, None)] == 6 and min(sizes.values()) >= 5


def test_ladder_reaches_postal_suppression_when_needed(spark):
    # Eight persons per decade and sex, each with their own postal prefix: only
    # 10-year bands without postal prefix make classes of five.
    rows = [(f"p{i}", "F" if i % 2 else "M", 1950 + (i // 2) % 10, f"{chr(65 + i % 7)}1A") for i in range(40)]
    out, report = k_anonymise(spark.createDataFrame(rows, SCHEMA), QIS, 5)
    assert report.level == 4 and report.postal_characters == 0 and report.suppressed == 0
    assert min(classes([r.asDict() for r in out.collect()]).values()) >= 5
    assert {r.postal_prefix for r in out.collect()} == {None}


def test_a_person_seen_twice_falls_in_one_class(spark):
    rows = [(f"p{i}", "F", 1960, "H2X") for i in range(6)] + [("p0", "F", 1960, "H3Z")]
    out, report = k_anonymise(spark.createDataFrame(rows, SCHEMA), QIS, 5)
    got = [r.asDict() for r in out.collect()]
    assert len(got) == 7 and report.persons == 6
    assert {r["postal_prefix"] for r in got if r["person_id"] == "p0"} in ({None}, {"H"})
    assert all(n >= 5 for n in classes(got).values())


def test_fewer_persons_than_k_are_all_suppressed(spark):
    rows = [("a", "F", 1960, "H2X"), ("b", "M", 1990, "G1R")]
    out, report = k_anonymise(spark.createDataFrame(rows, SCHEMA), QIS, 5)
    assert report.suppressed == 2
    assert {tuple(r)[1:] for r in out.collect()} == {(None, None, None)}


def test_risk_counts_persons_unique_with_their_diagnoses(spark):
    patients = spark.createDataFrame([(f"p{i}", "F", 1960, "H2X") for i in range(6)], SCHEMA)
    diagnosis = spark.createDataFrame([("p0", "E11"), ("p0", "I10"), ("p1", "E11"), ("p1", "I10"), ("p2", "C50"),
                                       ("p3", "E11"), ("p3", "E11")], "person_id string, condition_source_value string")
    risk = reidentification_risk(patients, QIS, diagnosis)
    # {E11, I10} x2, {C50} x1, {E11} x1, {} x2 (p4, p5): two persons unique out of six.
    assert risk["unique_on_quasi_identifiers"] == 0.0
    assert risk["unique_with_diagnoses"] == 2 / 6
    assert "unique_with_diagnoses" not in reidentification_risk(patients, QIS, None)


def test_quasi_identifiers_must_be_demographic_columns_of_patient(consortium):
    import dataclasses

    import pytest
    from pydantic import ValidationError

    from jobs.core.config import Project
    from jobs.privacy.policy import policy_problems

    project = next(iter(consortium.projects.values()))
    with pytest.raises(ValidationError, match="not a demographic column"):
        Project.model_validate(project.model_dump() | {"quasi_identifiers": ["person_id", "year_of_birth"]})
    # A project assembled in code skips validation; the publish-time check still catches it.
    bad = project.model_copy(update={"quasi_identifiers": ["visit_source_value"], "k_anonymity": 1})
    reasons = {(p.key, p.reason.split(";")[0][:40]) for p in
               policy_problems(dataclasses.replace(consortium, projects={project.id: bad}))}
    assert ("k_anonymity", "must be at least 2") in reasons
    assert any(key == "quasi_identifiers" for key, _ in reasons)
