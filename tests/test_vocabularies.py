"""Codes are valid when well formed for their system; reference lists are an overlay."""

import pytest

from jobs.reference.vocabularies import (
    VOCABULARY_TOKENS,
    is_well_formed,
    mod10_check_digit,
    system_for,
    verhoeff_ok,
    well_formed,
)

WELL_FORMED = [
    ("LOINC", "718-7"),       # haemoglobin
    ("LOINC", "8302-2"),      # body height
    ("LOINC", "29463-7"),     # body weight
    ("LOINC", "8480-6"),      # systolic blood pressure
    ("LOINC", "8462-4"),      # diastolic blood pressure
    ("LOINC", "2160-0"),      # creatinine (mass/volume), not in the reference list
    ("SNOMED", "38341003"),   # hypertensive disorder
    ("SNOMED", "73211009"),   # diabetes mellitus
    ("SNOMED", "22298006"),   # myocardial infarction
    ("RxNorm", "197361"),     # amlodipine 5 mg oral tablet
    ("ATC", "A10BA02"),       # metformin
    ("ATC", "A10"),           # a shorter ATC level
    ("DIN", "02242974"),
    ("ICD10CA", "E11.9"),
    ("ICD10CA", "E1152"),
    ("ICD10CM", "S52.521A"),
    ("ICD10", "I10"),
]
MALFORMED = [
    ("LOINC", "718-6"),       # wrong check digit
    ("LOINC", "8302-3"),      # wrong check digit
    ("LOINC", "12345678-9"),  # too long
    ("SNOMED", "38341004"),   # wrong Verhoeff check digit
    ("SNOMED", "73211019"),   # partition 01 is a description, not a concept
    ("SNOMED", "12A"),
    ("RxNorm", "123456789"),  # more than 8 digits
    ("ATC", "A10BA2"),
    ("DIN", "2242974"),       # 7 digits
    ("ICD10CA", "8K0.2"),
    ("ICD10", "E11.9.1"),
]


@pytest.mark.parametrize("system, code", WELL_FORMED)
def test_real_codes_are_well_formed(system, code):
    assert is_well_formed(system, code)


@pytest.mark.parametrize("system, code", MALFORMED)
def test_malformed_codes_are_not(system, code):
    assert not is_well_formed(system, code)


def test_check_digits():
    assert mod10_check_digit("718") == 7 and mod10_check_digit("29463") == 7
    assert verhoeff_ok("38341003") and not verhoeff_ok("38341002")


def test_systems_are_found_by_any_name_or_uri():
    assert system_for("http://snomed.info/sct").vocabulary == "SNOMED"
    assert system_for("SNOMED CT").vocabulary == "SNOMED"
    assert system_for("CIM-10").vocabulary == "ICD10"
    assert system_for("ICD-10-CM").vocabulary == "ICD10CM"
    assert system_for("http://www.nlm.nih.gov/research/umls/rxnorm").vocabulary == "RxNorm"
    assert system_for("OTHER") is None
    assert VOCABULARY_TOKENS["HTTPLOINCORG"] == "LOINC"


def test_spark_and_python_validators_agree(spark):
    from jobs.reference.vocabularies import BY_VOCABULARY

    cases = [(BY_VOCABULARY[system_for(s).vocabulary].vocabulary, c) for s, c in WELL_FORMED + MALFORMED]
    df = spark.createDataFrame(cases + [("OTHER", "X1"), ("LOINC", None)], "v string, c string")
    from pyspark.sql import functions as F

    got = {(r.v, r.c): r.ok for r in df.select("v", "c", well_formed(F.col("v"), F.col("c")).alias("ok")).collect()}
    assert got == {**{case: is_well_formed(*case) for case in cases}, ("OTHER", "X1"): None, ("LOINC", None): None}


def test_the_consortium_extends_reference_lists_without_code(tmp_path, monkeypatch):
    from jobs import reference

    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "loinc.csv").write_text(
        "code,display,unit,typical_low,typical_high,plausible_low,plausible_high\n"
        "8302-2,Body height,cm,150,190,20,280\n", encoding="utf-8")
    monkeypatch.setenv(reference.ENV_CONFIG_DIR, str(tmp_path))
    reference.loinc.cache_clear()
    try:
        tests = reference.loinc()
        assert tests["8302-2"].unit == "cm" and "718-7" in tests
        (tmp_path / "reference" / "loinc.csv").write_text(
            "code,display,unit,typical_low,typical_high,plausible_low,plausible_high\n"
            "8302-3,Body height,cm,150,190,20,280\n", encoding="utf-8")
        reference.loinc.cache_clear()
        with pytest.raises(reference.ReferenceListError, match="'8302-3' is not a well-formed LOINC code"):
            reference.loinc()
    finally:
        monkeypatch.delenv(reference.ENV_CONFIG_DIR)
        reference.loinc.cache_clear()
