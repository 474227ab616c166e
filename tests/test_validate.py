"""Validation: each rule catches its defect, clean rows pass, batch-level rules stop the batch."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs.core.lake import TRANSIENT_PARTITIONS, Lake
from jobs.core.ops import append_batch_log
from jobs.core.schemas import DATASETS, staged_schema
from jobs.core.tables import OVERWRITE, ensure_table

EST = "chu_test"
FP = "fp-test-0001"
EXTRACTED = dt.datetime(2026, 1, 5, 2, 0)
DAY = dt.timedelta(days=1)


# ------------------------------------------------------------- helpers ----

def staged_frame(spark, dataset: str, batch_id: str, extracted_at: dt.datetime, rows: list[dict]):
    """Staged rows of one batch; unspecified columns take clean defaults or null."""
    schema = staged_schema(dataset)
    base = {"establishment_id": EST, "_batch_id": batch_id, "_extracted_at": extracted_at, "record_action": "upsert",
            "_parse_errors": [], "_source_file": f"{EST}/{batch_id}/{dataset}.csv"}
    data = [tuple(({**base, "_source_line": i + 2} | row).get(f.name) for f in schema.fields)
            for i, row in enumerate(rows)]
    return spark.createDataFrame(data, schema)


def stage_batch(spark, lake: Lake, batch_id: str, rows: dict[str, list[dict]], extracted_at: dt.datetime = EXTRACTED,
                kind: str = "full", ingest_quarantined: dict[str, int] | None = None,
                duplicates: dict[str, int] | None = None) -> None:
    """What ingest and pseudonymise leave for one batch: staged tables and their batch log entries."""
    ingest_quarantined, duplicates = ingest_quarantined or {}, duplicates or {}
    for dataset, dataset_rows in rows.items():
        path = lake.staged(dataset)
        ensure_table(spark, path, staged_schema(dataset), FP, partition_by=TRANSIENT_PARTITIONS)
        (staged_frame(spark, dataset, batch_id, extracted_at, dataset_rows).write.format("delta").mode(OVERWRITE)
         .option("replaceWhere", f"establishment_id = '{EST}' AND _batch_id = '{batch_id}'").save(path))
    append_batch_log(spark, lake, [
        {"establishment_id": EST, "batch_id": batch_id, "dataset": d, "stage": "ingest", "status": "ingested",
         "rows_read": len(r) + ingest_quarantined.get(d, 0) + duplicates.get(d, 0),
         "rows_quarantined": ingest_quarantined.get(d, 0), "extracted_at": extracted_at, "kind": kind}
        for d, r in rows.items()
    ] + [
        {"establishment_id": EST, "batch_id": batch_id, "dataset": d, "stage": "pseudonymise",
         "status": "pseudonymised", "rows_read": len(r) + duplicates.get(d, 0), "rows_duplicates": duplicates.get(d, 0)}
        for d, r in rows.items()
    ])


def enc(key, person="p1", start=dt.datetime(2025, 12, 1, 8, 0), end=dt.datetime(2025, 12, 3, 10, 0), **extra):
    row = {"visit_occurrence_id": key, "person_id": person, "visit_start_datetime": start, "visit_end_datetime": end,
           "visit_start_date": start.date() if start else None, "visit_end_date": end.date() if end else None,
           "visit_source_value": "inpatient", "care_site_source_value": "ICU"}
    return row | extra


def patient(key, person="p1", year=1960, month=5, **extra):
    return {"patient_key": key, "person_id": person, "person_id_source": "nam", "gender_source_value": "female",
            "year_of_birth": year, "month_of_birth": month, "is_deceased": False} | extra


def diag(key, code="E11.9", system="ICD10CA", on=dt.date(2025, 12, 2), **extra):
    return {"condition_occurrence_id": key, "person_id": "p1", "visit_occurrence_id": "v1", "condition_start_date": on,
            "condition_source_value": code, "condition_source_vocabulary": system,
            "condition_status_source_value": "principal"} | extra


def lab(key, code="14749-6", value=5.2, at=dt.datetime(2025, 12, 2, 7, 30), **extra):
    return {"measurement_id": key, "person_id": "p1", "visit_occurrence_id": "v1", "measurement_datetime": at,
            "measurement_date": at.date() if at else None, "measurement_source_value": code,
            "measurement_source_vocabulary": "LOINC", "value_as_number": value,
            "value_source_value": None if value is None else str(value), "unit_source_value": "mmol/L"} | extra


def med(key, code="A10BA02", system="ATC", start=dt.date(2025, 12, 1), end=dt.date(2025, 12, 20), **extra):
    return {"drug_exposure_id": key, "person_id": "p1", "visit_occurrence_id": "v1", "drug_exposure_start_date": start,
            "drug_exposure_end_date": end, "drug_source_value": code, "drug_source_vocabulary": system,
            "dose_value": 500.0, "dose_unit_source_value": "mg", "route_source_value": "po"} | extra


def consent(key, purpose="research_general", decision="permit", on=dt.date(2025, 11, 1), **extra):
    return {"consent_id": key, "person_id": "p1", "purpose": purpose, "decision": decision, "decision_date": on,
            "valid_from": on, "valid_until": None} | extra


def delete(dataset_key: str, key: str) -> dict:
    return {dataset_key: key, "record_action": "delete"}


def quarantined(spark, lake: Lake, batch_id: str) -> Counter:
    rows = (spark.read.format("delta").load(lake.quarantine())
            .where((F.col("batch_id") == batch_id) & (F.col("stage") == "validate")).collect())
    return Counter((r.dataset, json.loads(r.record_safe)[_key_of(r.dataset)], r.rule) for r in rows)


def _key_of(dataset: str) -> str:
    from jobs.core.schemas import SILVER_KEY

    return SILVER_KEY[dataset]


@pytest.fixture()
def lake(lake_root) -> Lake:
    return Lake(lake_root)


# --------------------------------------------------------------- suites ----

def test_every_dataset_has_a_gx_suite_whose_expectations_carry_rule_and_kind(spark):
    from great_expectations.core.expectation_suite import ExpectationSuite

    from jobs.stages.validate import KIND_ROW, ROW_RULES, check_failure, load_suite, suite_checks, suite_parameters

    seen_rules = set()
    for dataset in DATASETS:
        data = load_suite(dataset)
        suite = ExpectationSuite(**data)
        assert len(suite.expectations) == len(data["expectations"]), dataset
        assert suite.to_json_dict()["expectations"] == data["expectations"]
        checks = suite_checks(data)
        assert {c.rule for c in checks if c.kind == "batch"} == {"batch.row_count_drop", "batch.column_change"}
        for check in checks:
            if check.kind == KIND_ROW:
                check_failure(check, suite_parameters(None))  # every row-level expectation has a translation
        seen_rules |= {c.rule for c in checks}
    assert set(ROW_RULES) <= seen_rules


# ------------------------------------------------------------ row rules ----

def test_each_rule_quarantines_exactly_its_defective_rows(spark, lake, consortium):
    from jobs.stages.validate import validate_batch

    later = EXTRACTED + 40 * DAY
    rows = {
        "patient": [
            patient("pa1"), patient("pa2", person="p2", gender_source_value=None), delete("patient_key", "pa3"),
            patient(None),                                                        # completeness.required
            patient("pa5", year=None, _parse_errors=["date:year_of_birth"]),      # conformance.date
            patient("pa6", gender_source_value="x"),                              # conformance.code
            patient("pa7", year=2026, month=3),                                   # plausibility.future_date
            patient("pa8", year=1850),                                            # plausibility.range
            patient("pa9"), patient("pa9", person="p9"),                          # integrity.unique_key (both)
            patient("pa10", person="p10", year=2000),
        ],
        "encounter": [
            enc("v1"), enc("v2", end=None), delete("visit_occurrence_id", "v3"),
            enc("v4", person=None),                                               # completeness.required
            enc("v5", start=None, _parse_errors=["date:visit_start_date"]),       # conformance.date
            enc("v6", start=later, end=later + DAY),                              # plausibility.future_date
            enc("v7", end=dt.datetime(2025, 11, 30)),                             # plausibility.date_order
            enc("v8", person=None, person_id_flag="unknown_patient"),             # integrity.patient_ref
            enc("v9", person="p10", start=dt.datetime(1999, 5, 1), end=dt.datetime(1999, 5, 2)),  # before birth
            enc("v10", visit_reason_source_value="38341003", visit_reason_source_vocabulary="SNOMED"),  # lands
            enc("v11", visit_reason_source_value="44054007", visit_reason_source_vocabulary="SNOMED"),  # check digit
            enc("v12", visit_reason_source_value="38341003"),                     # conformance.code (no system)
        ],
        "diagnosis": [
            diag("d1"), diag("d2", code="73211009", system="SNOMED"), diag("d3", code="I10", system="ICD10"),
            diag("d4", code=None),                                                # completeness.required
            diag("d5", code="8K0.2"),                                             # conformance.code (malformed)
            diag("d6", code="12A", system="SNOMED"),                              # conformance.code (format)
            diag("d7", system="OTHER"),                                           # conformance.code (system)
            diag("d8", on=(later).date()),                                        # plausibility.future_date
            diag("d9", code="K80.2"), diag("d10", code="38341003", system="SNOMED"),  # not in the list: land
            diag("d11", condition_end_date=dt.date(2025, 12, 1)),                 # plausibility.date_order
            diag("d12", condition_end_date=dt.date(2025, 12, 20)),                # resolved: lands
        ],
        "lab_result": [
            lab("l1"), lab("l2", value=None, value_source_value="positive"),
            lab("l3", value=None, _parse_errors=["number:value_as_number"]),      # conformance.number
            lab("l4", code="2160-1"),                                             # conformance.code (check digit)
            lab("l5", value=600.0),                                               # plausibility.range (high)
            lab("l6", value=0.1),                                                 # plausibility.range (low)
            lab("l7", at=None),                                                   # completeness.required
            lab("l8", code="8302-2", value=172.0, unit_source_value="cm"),        # body height: lands
            lab("l9", category="laboratory"),                                     # lands
            lab("l10", category="chemistry"),                                     # conformance.code (category)
        ],
        "medication": [
            med("m1"), med("m2", code="02380080", system="DIN", end=None),
            med("m3", code="C09CA1"),                                             # conformance.code (malformed)
            med("m4", end=dt.date(2025, 11, 1)),                                  # plausibility.date_order
            med("m5", dose_value=-1.0),                                           # plausibility.range
            med("m6", dose_value=None, _parse_errors=["number:dose_value"]),      # conformance.number
            med("m7", code="197361", system="RxNorm"),                            # RxNorm: lands
            med("m8", drug_dispense_date=dt.date(2025, 12, 21)),                  # dispensed after it ended
            med("m9", drug_dispense_date=dt.date(2025, 12, 2)),                   # lands
        ],
        "consent": [
            consent("c1"), consent("c2", decision="withdraw"),
            consent("c3", purpose="marketing"),                                   # conformance.code
            consent("c4", decision=None),                                         # completeness.required
            consent("c5", valid_from=dt.date(2025, 11, 2), valid_until=dt.date(2025, 11, 1)),  # date_order
        ],
    }
    stage_batch(spark, lake, "b1", rows)
    outcome = validate_batch(spark, lake, consortium, EST, "b1", "full")

    assert quarantined(spark, lake, "b1") == Counter({
        ("patient", None, "completeness.required"): 1, ("patient", "pa5", "conformance.date"): 1,
        ("patient", "pa6", "conformance.code"): 1, ("patient", "pa7", "plausibility.future_date"): 1,
        ("patient", "pa8", "plausibility.range"): 1, ("patient", "pa9", "integrity.unique_key"): 2,
        ("encounter", "v4", "completeness.required"): 1, ("encounter", "v5", "conformance.date"): 1,
        ("encounter", "v6", "plausibility.future_date"): 1, ("encounter", "v7", "plausibility.date_order"): 1,
        ("encounter", "v8", "integrity.patient_ref"): 1, ("encounter", "v9", "plausibility.date_order"): 1,
        ("encounter", "v11", "conformance.code"): 1, ("encounter", "v12", "conformance.code"): 1,
        ("diagnosis", "d11", "plausibility.date_order"): 1, ("lab_result", "l10", "conformance.code"): 1,
        ("medication", "m8", "plausibility.date_order"): 1,
        ("diagnosis", "d4", "completeness.required"): 1, ("diagnosis", "d5", "conformance.code"): 1,
        ("diagnosis", "d6", "conformance.code"): 1, ("diagnosis", "d7", "conformance.code"): 1,
        ("diagnosis", "d8", "plausibility.future_date"): 1,
        ("lab_result", "l3", "conformance.number"): 1, ("lab_result", "l4", "conformance.code"): 1,
        ("lab_result", "l5", "plausibility.range"): 1, ("lab_result", "l6", "plausibility.range"): 1,
        ("lab_result", "l7", "completeness.required"): 1,
        ("medication", "m3", "conformance.code"): 1, ("medication", "m4", "plausibility.date_order"): 1,
        ("medication", "m5", "plausibility.range"): 1, ("medication", "m6", "conformance.number"): 1,
        ("consent", "c3", "conformance.code"): 1, ("consent", "c4", "completeness.required"): 1,
        ("consent", "c5", "plausibility.date_order"): 1,
    })
    valid = {d: o.valid for d, o in outcome.datasets.items()}
    assert valid == {"patient": 4, "encounter": 4, "diagnosis": 6, "lab_result": 4, "medication": 4, "consent": 2}

    q = spark.read.format("delta").load(lake.quarantine()).where(F.col("stage") == "validate")
    reasons = {r.reason for r in q.collect()}
    assert "visit_start_date: date did not parse with the establishment's format" in reasons
    assert not [r for r in reasons if re.search(r"\b(pa|p|v|d|l|m|c)[0-9]\b", r)]  # reasons never carry a value
    assert q.where(F.col("source_line").isNull() | F.col("source_file").isNull()).count() == 0

    results = spark.read.format("delta").load(lake.ops("validation_results")).where(F.col("batch_id") == "b1")
    unique = results.where((F.col("dataset") == "patient") & (F.col("rule") == "integrity.unique_key")).first()
    assert (unique.success, unique.unexpected_count) == (False, 2)
    not_listed = {r.dataset: r.unexpected_count for r in results.where(F.col("rule") == "code.not_in_reference_list").collect()}
    assert not_listed == {"diagnosis": 4, "lab_result": 1, "medication": 1}  # d2, d3, d9, d10; l8; m7
    assert Path(outcome.report).is_file() and "integrity.unique_key" in Path(outcome.report).read_text()
    index = (Path(lake.reports()) / "index.html").read_text(encoding="utf-8")
    page = Path(outcome.report).relative_to(lake.reports()).as_posix()
    row_failures = results.where(F.col("kind") == "row").agg(F.sum("unexpected_count")).first()[0]
    run = re.search(rf"<tr><td>{EST}</td><td><a href='{re.escape(page)}'>b1</a></td>(.*?)</tr>", index)
    assert run and "failed" in run.group(1) and f"<td>{row_failures}</td>" in run.group(1), index


def test_a_row_gets_the_first_failing_rule_in_order(spark, lake, consortium):
    from jobs.stages.validate import validate_batch

    future = EXTRACTED + 60 * DAY
    rows = {
        "diagnosis": [
            diag("d1"),
            # missing person, unparseable date, unknown code: completeness wins
            diag("d2", person_id=None, condition_start_date=None, condition_source_value="ZZZ",
                 _parse_errors=["date:condition_start_date"]),
            # unparseable date and unknown code: conformance.date before conformance.code
            diag("d3", condition_start_date=None, condition_source_value="ZZZ",
                 _parse_errors=["date:condition_start_date"]),
            # unknown code and future date: conformance before plausibility
            diag("d4", code="ZZZ", on=future.date()),
            # future date on one of two rows sharing a key: plausibility before integrity
            diag("d5", on=future.date()), diag("d5"),
        ],
        "encounter": [
            # a delete needs only its key
            {"visit_occurrence_id": "v9", "record_action": "delete", "_parse_errors": ["date:visit_start_date"]},
            # a delete without key is incomplete
            {"visit_occurrence_id": None, "record_action": "delete"},
            enc("v1"),
        ],
    }
    stage_batch(spark, lake, "b1", rows)
    validate_batch(spark, lake, consortium, EST, "b1", "incremental")
    assert quarantined(spark, lake, "b1") == Counter({
        ("diagnosis", "d2", "completeness.required"): 1, ("diagnosis", "d3", "conformance.date"): 1,
        ("diagnosis", "d4", "conformance.code"): 1, ("diagnosis", "d5", "plausibility.future_date"): 1,
        ("diagnosis", "d5", "integrity.unique_key"): 1, ("encounter", None, "completeness.required"): 1,
    })

    # Re-running replaces the batch's validate quarantine and results, it does not add to them.
    before = spark.read.format("delta").load(lake.ops("validation_results")).count()
    validate_batch(spark, lake, consortium, EST, "b1", "incremental")
    assert sum(quarantined(spark, lake, "b1").values()) == 6
    assert spark.read.format("delta").load(lake.ops("validation_results")).count() == before


# ---------------------------------------------------------- batch rules ----

def _land(spark, lake, batch_id):
    from jobs.stages.land import land_batch

    return land_batch(spark, lake, EST, batch_id, FP)


def test_too_many_quarantined_rows_stop_the_batch_and_silver_stays_at_its_version(spark, lake, consortium):
    from jobs.stages.land import BatchNotValidated
    from jobs.core.tables import table_version
    from jobs.stages.validate import BatchRejected, validate_batch

    stage_batch(spark, lake, "b1", {"encounter": [enc(f"v{i}") for i in range(25)]})
    validate_batch(spark, lake, consortium, EST, "b1", "full")
    _land(spark, lake, "b1")
    version = table_version(spark, lake.silver("encounter"))

    # 20 clean rows, 3 bad ones, and 4 rows already quarantined at ingest: 7 of 27 = 25.9% > 20%
    bad = [enc(f"x{i}", person=None) for i in range(3)]
    stage_batch(spark, lake, "b2", {"encounter": [enc(f"w{i}") for i in range(20)] + bad},
                extracted_at=EXTRACTED + 7 * DAY, kind="incremental", ingest_quarantined={"encounter": 4})
    with pytest.raises(BatchRejected) as caught:
        validate_batch(spark, lake, consortium, EST, "b2", "incremental")
    message = str(caught.value)
    for part in (EST, "b2", "encounter", "batch.quarantined_rate", "7 of 27", "25.9%"):
        assert part in message
    assert caught.value.failures[0].rule == "batch.quarantined_rate"

    with pytest.raises(BatchNotValidated):
        _land(spark, lake, "b2")
    assert table_version(spark, lake.silver("encounter")) == version
    from jobs.stages.validate import validated_path

    assert spark.read.format("delta").load(validated_path(lake, "encounter")).where(F.col("_batch_id") == "b2").count() == 0

    # The establishment's own threshold for the dataset (batch_rules in its file) lets the same batch through.
    import dataclasses

    from jobs.core.config import BatchRuleOverride, EstablishmentBatchRules

    own = EstablishmentBatchRules(datasets={"encounter": BatchRuleOverride(max_quarantined_pct=30)})
    lenient = dataclasses.replace(consortium, establishments={
        **consortium.establishments,
        EST: consortium.establishments["chu_laurentides"].model_copy(update={"id": EST, "batch_rules": own})})
    validate_batch(spark, lake, lenient, EST, "b2", "incremental")
    assert spark.read.format("delta").load(validated_path(lake, "encounter")).where(F.col("_batch_id") == "b2").count() == 20


def test_a_full_batch_much_smaller_than_the_previous_one_is_stopped_but_not_an_incremental(spark, lake, consortium):
    from jobs.core.tables import table_version
    from jobs.stages.validate import BatchRejected, validate_batch

    stage_batch(spark, lake, "b1", {"consent": [consent(f"c{i}") for i in range(10)]})
    validate_batch(spark, lake, consortium, EST, "b1", "full")
    _land(spark, lake, "b1")
    version = table_version(spark, lake.silver("consent"))

    stage_batch(spark, lake, "b2", {"consent": [consent(f"c{i}") for i in range(4)]},
                extracted_at=EXTRACTED + 7 * DAY, kind="full")
    with pytest.raises(BatchRejected, match=r"consent: rule batch.row_count_drop failed \(4 rows vs 10 in the "
                                            r"previous full batch b1, a drop of 60.0% > 50%\)"):
        validate_batch(spark, lake, consortium, EST, "b2", "full")
    assert table_version(spark, lake.silver("consent")) == version

    stage_batch(spark, lake, "b3", {"consent": [consent(f"c{i}") for i in range(4)]},
                extracted_at=EXTRACTED + 14 * DAY, kind="incremental")
    assert validate_batch(spark, lake, consortium, EST, "b3", "incremental").datasets["consent"].valid == 4


def test_a_column_missing_from_the_batch_compared_with_silver_stops_it(spark, lake, consortium):
    from jobs.core.tables import table_version
    from jobs.stages.validate import BatchRejected, validate_batch

    stage_batch(spark, lake, "b1", {"encounter": [enc("v1")]})
    validate_batch(spark, lake, consortium, EST, "b1", "full")
    _land(spark, lake, "b1")
    spark.sql(f"ALTER TABLE delta.`{lake.silver('encounter')}` ADD COLUMNS (admission_reason STRING)")
    version = table_version(spark, lake.silver("encounter"))

    stage_batch(spark, lake, "b2", {"encounter": [enc("v2")]}, extracted_at=EXTRACTED + 7 * DAY, kind="incremental")
    with pytest.raises(BatchRejected, match="encounter: rule batch.column_change"):
        validate_batch(spark, lake, consortium, EST, "b2", "incremental")
    assert table_version(spark, lake.silver("encounter")) == version


def test_a_column_the_canonical_schema_added_since_silver_was_made_is_no_change(spark, lake, consortium):
    """A silver encounter table from before visit reasons: the batch is not stopped for the columns the
    schema added, and land adds them to silver."""
    from pyspark.sql.types import StructType

    from jobs.core.schemas import SILVER_SCHEMAS
    from jobs.stages.validate import validate_batch

    added = ("visit_reason_source_value", "visit_reason_source_vocabulary")
    old = StructType([f for f in SILVER_SCHEMAS["encounter"].fields if f.name not in added])
    ensure_table(spark, lake.silver("encounter"), old, partition_by=("establishment_id",))
    stage_batch(spark, lake, "b1", {"encounter": [enc("v1", visit_reason_source_value="38341003",
                                                      visit_reason_source_vocabulary="SNOMED")]})
    assert validate_batch(spark, lake, consortium, EST, "b1", "full").datasets["encounter"].valid == 1
    _land(spark, lake, "b1")
    (row,) = spark.read.format("delta").load(lake.silver("encounter")).collect()
    assert (row.visit_reason_source_value, row.visit_reason_source_vocabulary) == ("38341003", "SNOMED")


# ------------------------------------------------------------ benchmark ----

def test_measure_engines_times_gx_and_the_spark_translation_on_the_same_rows(spark):
    from jobs.stages.validate import measure_engines

    staged = staged_frame(spark, "lab_result", "b1", EXTRACTED, [lab(f"l{i}") for i in range(5)] + [lab("l9", value=999.0)])
    seconds = measure_engines(spark, staged, "lab_result")
    assert set(seconds) == {"gx", "spark"} and all(s > 0 for s in seconds.values())


def test_gx_suites_validated_side_by_side_give_what_each_gives_alone(spark):
    """The datasets of a batch are validated by GX at once (one thread each): every result, query
    expectations included (GX runs those on a view of one fixed name), is the one of a validation alone."""
    from jobs.core.tables import on_each_table
    from jobs.stages.validate import enriched_columns, load_suite, run_gx_suite, suite_parameters

    frames = {
        "diagnosis": _flagged(spark, "diagnosis", [diag("d1"), diag("d2", code=None), diag("d3", on=dt.date(2030, 1, 1))]),
        "lab_result": _flagged(spark, "lab_result", [lab("l1"), lab("l2", value=999.0), lab("l3", code="bad")]),
        "encounter": _flagged(spark, "encounter", [enc("v1"), enc("v2", end=dt.datetime(2025, 11, 1, 8, 0))]),
        "patient": _flagged(spark, "patient", [patient("k1"), patient("k2", year=1800)]),
    }

    def run(dataset, flagged, columns):
        enriched = enriched_columns(columns, dataset)
        return lambda: run_gx_suite(spark, flagged.select(*enriched), dataset, load_suite(dataset),
                                    suite_parameters(None, min_row_count=0, expected_columns=enriched))

    runs = {d: run(d, f, columns) for d, (f, _, columns) in frames.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AFFLUENT_TABLE_THREADS", str(len(runs)))
        # A view's registration and the query that reads it, further apart: another thread's view would show.
        register = type(spark.range(1)).createOrReplaceTempView
        mp.setattr(type(spark.range(1)), "createOrReplaceTempView",
                   lambda df, name: (register(df, name), time.sleep(0.3))[0])
        together = on_each_table(runs)
    alone = {d: run() for d, run in runs.items()}
    assert together == alone
    # Query expectations that fail on their own dataset's columns (a view of another dataset has none of them).
    failing = {(d, r.check): r.unexpected_count for d, results in alone.items() for r in results if r.unexpected_count}
    assert failing[("lab_result", "measurement_source_value.well_formed")] == 1
    assert failing[("diagnosis", "condition_source_value.required")] == 1


def test_plausibility_bounds_judge_values_in_the_unit_of_the_bound(spark, lake, consortium):
    from jobs.stages.validate import validate_batch

    rows = {"lab_result": [
        lab("h1", code="718-7", value=13.5, unit_source_value="g/dL"),   # haemoglobin 135 g/L: lands
        lab("h2", code="718-7", value=135.0, unit_source_value="g/L"),   # lands
        lab("h3", code="718-7", value=1350.0, unit_source_value="g/L"),  # implausible
        lab("h4", code="718-7", value=8.4, unit_source_value="mmol/L"),  # no conversion: bound not applied
        lab("h5", code="14749-6", value=99.0, unit_source_value="mg/dL"),  # glucose 5.5 mmol/L: lands
    ]}
    stage_batch(spark, lake, "b1", rows)
    outcome = validate_batch(spark, lake, consortium, EST, "b1", "full")
    assert quarantined(spark, lake, "b1") == Counter({("lab_result", "h3", "plausibility.range"): 1})
    assert outcome.datasets["lab_result"].valid == 4
    results = spark.read.format("delta").load(lake.ops("validation_results")).where(F.col("batch_id") == "b1")
    skipped = results.where(F.col("rule") == "value.bound_not_applied").first()
    assert (skipped.dataset, skipped.unexpected_count) == ("lab_result", 1)


# ------------------------------------------------- transforms, no Delta ----

def _flagged(spark, dataset: str, rows: list[dict]):
    from jobs.stages.validate import flag_rows, load_suite, suite_checks, suite_parameters, with_reference_columns

    checks = suite_checks(load_suite(dataset))
    staged = staged_frame(spark, dataset, "b1", EXTRACTED, rows)
    return flag_rows(with_reference_columns(staged, dataset), checks, suite_parameters(None)), checks, staged.columns


def test_one_job_counts_every_dataset_as_each_would_be_counted_alone(spark):
    from jobs.stages.validate import count_batch, count_batches

    flagged = {
        "diagnosis": _flagged(spark, "diagnosis", [diag("d1"), diag("d2", code=None), diag("d3", code="K80.2")]),
        "consent": _flagged(spark, "consent", [consent("c1"), consent("c2", purpose="marketing")]),
        "lab_result": _flagged(spark, "lab_result", [lab("l1"), lab("l2", value=999.0)]),
    }
    together = count_batches({d: (f, checks) for d, (f, checks, _) in flagged.items()})
    assert together == {d: count_batch(f, checks, d) for d, (f, checks, _) in flagged.items()}
    assert together["diagnosis"].by_rule == {"completeness.required": 1}
    assert together["diagnosis"].information == {"code.not_in_reference_list": 1}
    assert together["consent"].information == {}  # another dataset's information columns are not the consent's
    assert together["lab_result"].information == {"code.not_in_reference_list": 0, "value.bound_not_applied": 0}
    # Without a consortium no purpose is declared: both consent rows fail their purpose check.
    assert (together["consent"].rows, together["consent"].by_rule) == (2, {"conformance.code": 2})


def test_flagged_rows_split_into_quarantine_and_validated_rows_that_add_up(spark):
    from jobs.core.schemas import QUARANTINE_SCHEMA
    from jobs.stages.validate import kept_rows, quarantine_rows, validated_rows

    flagged, _, columns = _flagged(spark, "encounter", [enc("v1"), enc("v2", person=None), enc("v3")])
    quarantine = quarantine_rows(flagged, "encounter", columns, dt.datetime(2026, 1, 6))
    validated = validated_rows(kept_rows(flagged, columns), "encounter")
    assert [(f.name, f.dataType) for f in quarantine.schema] == [(f.name, f.dataType) for f in QUARANTINE_SCHEMA]
    assert [(r.rule, r.stage, r.batch_id) for r in quarantine.collect()] == [("completeness.required", "validate", "b1")]
    assert [(f.name, f.dataType) for f in validated.schema] == [(f.name, f.dataType) for f in staged_schema("encounter")]
    assert sorted(r.visit_occurrence_id for r in validated.collect()) == ["v1", "v3"]


def _gx(check: str, rule: str, kind: str, success: bool, unexpected: int | None):
    from jobs.stages.validate import GxResult

    return GxResult(check, rule, kind, success, unexpected, None, None)


def test_judging_a_dataset_needs_no_spark_and_refuses_engines_that_disagree():
    from jobs.core.config import BatchRules
    from jobs.stages.validate import BatchCounts, EngineDisagreement, judge_dataset

    counts = BatchCounts(rows=30, failures={"person_id.required": 8}, by_rule={"completeness.required": 8},
                         information={}, extracted_at=EXTRACTED)
    rules = BatchRules()
    figures = dict(rules=rules, previous=("b0", 100), expected_columns=["a"], ingest=(32, 2),
                   establishment_id=EST, batch_id="b1", run_at=EXTRACTED)
    judged = judge_dataset("consent", counts, [
        _gx("person_id.required", "completeness.required", "row", False, 8),
        _gx("row_count.no_drop", "batch.row_count_drop", "batch", False, None)], **figures)
    assert judged.outcome.valid == 22 and judged.outcome.quarantined == 8
    assert [f.rule for f in judged.failures] == ["batch.row_count_drop", "batch.quarantined_rate"]
    assert "30 rows vs 100 in the previous full batch b0, a drop of 70.0%" in str(judged.failures[0])
    assert "10 of 32 rows read quarantined (2 at ingest, 8 at validate)" in str(judged.failures[1])
    assert [r[3] for r in judged.results] == ["person_id.required", "row_count.no_drop", "quarantined_rate"]

    with pytest.raises(EngineDisagreement, match="consent.person_id.required: GX counts 7 failing rows"):
        judge_dataset("consent", counts, [_gx("person_id.required", "completeness.required", "row", False, 7)],
                      **figures)
