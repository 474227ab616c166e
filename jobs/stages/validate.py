"""Staged → validated: Great Expectations suites decide which rows land and whether the batch may.

One suite per canonical dataset lives in ``expectations/<dataset>.json`` (GX 1.x
format, reviewed in git). Each expectation names in its ``meta``:

- ``rule``: the rule id written to quarantine (``completeness.required``,
  ``conformance.date``, … ``integrity.patient_ref``; ``batch.*`` for batch rules);
- ``kind``: ``row`` (failing rows are quarantined, the others go on) or
  ``batch`` (failing stops the whole batch);
- ``check``: a short, stable name for reports and ``ops/validation_results``;
- ``reason``: what a quarantined row is told, naming the column and the class
  of problem, never a value.

How the suites run (chosen by measurement, see :func:`measure_engines`):

- GX validates every staged batch with its Spark datasource; its results
  (success and unexpected count per expectation) are persisted in
  ``ops/validation_results``, drive the batch-level rules and feed the HTML
  report.
- The row-level flags come from Spark expressions generated from the same
  suite definitions, in one pass over the batch: GX would need one job per
  expectation and a collect of unexpected row indices to say *which* rows
  fail. For every row-level expectation the two counts must agree, otherwise
  :class:`EngineDisagreement` stops the batch (a translation bug never lands
  data silently).

One row → one rule: the first failing expectation in the order completeness,
conformance, plausibility, integrity (then the suite's order), so a row's rule
is deterministic. Delete rows only need their record key (every other
row-level expectation is conditioned on ``record_action = 'upsert'``). A record
key that appears twice in one batch quarantines every row carrying it: exact
duplicates were already dropped, so two versions of one record in one extract
contradict each other and neither can be trusted to be the latest.

Batch-level rules (thresholds in ``config/pipeline.yaml`` ``batch_rules``, per
dataset under its ``datasets:``; an establishment's file may override them with
its own ``batch_rules``, see :meth:`jobs.core.config.Consortium.batch_rules`):

- ``batch.row_count_drop``: a ``full`` batch with fewer rows than the previous
  landed full batch of the establishment's dataset, by more than
  ``max_row_count_drop_pct`` (incremental batches are small by nature);
- ``batch.quarantined_rate``: more than ``max_quarantined_pct`` of the rows read
  (ingest + validate quarantine) rejected, judged on datasets with at least
  :data:`MIN_ROWS_FOR_RATE` rows read (a rate over a handful of rows says nothing);
- ``batch.column_change``: the staged columns differ from silver's;
- ``batch.mapped_share``: less than ``min_mapped_pct`` of the rows carrying a
  source value get a standard concept (:mod:`jobs.terminology.coverage`); the
  coverage is in the results and the report whatever the threshold.

Any of them raises :class:`BatchRejected`; nothing of the batch is handed to land.

Example::

    outcome = validate_batch(spark, lake, consortium, "chu_laurentides", "20260105-001", "full")
    print(outcome.report)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator
from functools import cache, partial, reduce
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, LongType, StringType, StructField, StructType, TimestampType
from pyspark.sql.window import Window

from jobs import reference
from jobs.reference import units, vocabularies
from jobs.core.config import Consortium
from jobs.core.lake import TRANSIENT_PARTITIONS, Lake
from jobs.core.batchlog import BatchKind, BatchRejected, Stage, Status
from jobs.core.ops import append_batch_log
from jobs.core.schemas import (
    CONCEPT_COLUMNS,
    DATASETS,
    QUARANTINE_SCHEMA,
    STAGED_EXTRA_FIELDS,
    silver_columns,
    staged_schema,
)
from jobs.core.tables import cast_to, ensure_table, on_each_table, replace_rows, table_exists
from jobs.core.writer_lock import Mode, writes_lake

STAGE = Stage.VALIDATE
SUITES_DIR = Path(__file__).resolve().parents[2] / "expectations"
VALIDATED_ZONE = "validated"
VALIDATION_RESULTS = "validation_results"

# Counts per expectation, no sample of unexpected values: a sample would cost one more Spark job per
# expectation, and values must not reach results or reports anyway.
GX_RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 0}
KIND_ROW = "row"
KIND_BATCH = "batch"

# Row-level rules, in the order that decides which one a row is quarantined for.
ROW_RULES = (
    "completeness.required",
    "conformance.date",
    "conformance.number",
    "conformance.code",
    "conformance.coded_field",
    "plausibility.future_date",
    "plausibility.date_order",
    "plausibility.range",
    "integrity.unique_key",
    "integrity.patient_ref",
)
RULE_ROW_COUNT_DROP = "batch.row_count_drop"
RULE_QUARANTINED_RATE = "batch.quarantined_rate"
RULE_COLUMN_CHANGE = "batch.column_change"
RULE_MAPPED_SHARE = "batch.mapped_share"
BATCH_RULES = (RULE_ROW_COUNT_DROP, RULE_QUARANTINED_RATE, RULE_COLUMN_CHANGE, RULE_MAPPED_SHARE)

# Below this many rows read, the quarantined share of a dataset is not judged.
MIN_ROWS_FOR_RATE = 20

# Columns added to the staged rows before validation: whether the code is well formed for its
# system and listed in the reference overlay; for lab results, the plausible bounds of the
# LOINC code (in its reference unit) and the value converted into that unit.
CODE_HELPERS = ("_code_well_formed", "_code_in_reference")
HELPER_COLUMNS = {
    "lab_result": ("_ref_plausible_low", "_ref_plausible_high", "_value_in_reference_unit", *CODE_HELPERS),
    "diagnosis": CODE_HELPERS,
    "medication": CODE_HELPERS,
    "encounter": ("_birth_year", "_reason_well_formed"),
}
# The code and vocabulary columns of each coded dataset.
CODED = {
    "diagnosis": ("condition_source_value", "condition_source_vocabulary"),
    "lab_result": ("measurement_source_value", "measurement_source_vocabulary"),
    "medication": ("drug_source_value", "drug_source_vocabulary"),
}
# Informational counts in ops/validation_results: they never quarantine a row nor stop a batch.
KIND_INFO = "info"
INFO_NOT_IN_REFERENCE = "code.not_in_reference_list"
INFO_BOUND_NOT_APPLIED = "value.bound_not_applied"
INFORMATION_NAMES = (INFO_NOT_IN_REFERENCE, INFO_BOUND_NOT_APPLIED)

# Suite parameters filled at run time (reference lists and configuration).
PARAM_MIN_ROW_COUNT = "min_row_count"
PARAM_EXPECTED_COLUMNS = "expected_columns"

VALIDATION_RESULTS_SCHEMA = StructType([
    StructField("establishment_id", StringType(), False),
    StructField("batch_id", StringType(), False),
    StructField("dataset", StringType(), False),
    StructField("expectation", StringType(), False),
    StructField("rule", StringType(), False),
    StructField("kind", StringType(), False),
    StructField("success", BooleanType(), False),
    StructField("unexpected_count", LongType(), True),
    StructField("element_count", LongType(), True),
    StructField("observed", StringType(), True),
    StructField("run_at", TimestampType(), False),
])

_UNEXPECTED_ROWS_PREFIX = "SELECT * FROM {batch} WHERE "


def rules_failed(establishment_id: str, batch_id: str, failures: list["BatchRuleFailure"]) -> BatchRejected:
    """The rejection of a batch whose batch-level rules failed; ``failures`` lists each rule and its figures."""
    reason = "; ".join(str(f) for f in failures)
    return BatchRejected(establishment_id, batch_id,
                         f"{reason}. Nothing of the batch was landed; see ops/validation_results and the "
                         "report, fix the extract with the establishment (or the thresholds: batch_rules in "
                         f"config/establishments/{establishment_id}.yaml, over config/pipeline.yaml's), then "
                         "`affluent batch retry` or `affluent batch skip`.",
                         failures=tuple(failures))


class SuiteError(Exception):
    """An expectation suite cannot be used (missing file, unknown rule or expectation type)."""


class EngineDisagreement(Exception):
    """GX and the generated Spark expressions counted different failures for one expectation."""


@dataclass(frozen=True)
class BatchRuleFailure:
    dataset: str
    rule: str
    figures: str

    def __str__(self) -> str:
        return f"dataset {self.dataset}: rule {self.rule} failed ({self.figures})"


@dataclass(frozen=True)
class Check:
    """One expectation of a suite, as the Spark translation and the reports see it."""

    name: str
    rule: str
    kind: str
    type: str
    kwargs: dict
    reason: str
    position: int

    @property
    def rank(self) -> tuple[int, int]:
        return (ROW_RULES.index(self.rule) if self.rule in ROW_RULES else len(ROW_RULES), self.position)


@dataclass(frozen=True)
class DatasetValidation:
    rows: int
    valid: int
    quarantined: int
    by_rule: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationOutcome:
    establishment_id: str
    batch_id: str
    batch_kind: str
    datasets: dict[str, DatasetValidation]
    report: str
    run_at: str


# ------------------------------------------------------------- suites ----

def load_suite(dataset: str, folder: Path = SUITES_DIR) -> dict:
    """The suite of one dataset as GX serialises it (``ExpectationSuite.to_json_dict()``)."""
    path = folder / f"{dataset}.json"
    if not path.is_file():
        raise SuiteError(f"{path} is missing: every canonical dataset needs its expectation suite.")
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def suite_checks(suite: dict) -> list[Check]:
    """The suite's expectations with their rule and kind; refuse one without them."""
    found = []
    for i, exp in enumerate(suite.get("expectations", [])):
        meta: Any = exp.get("meta") or {}
        rule, kind, name = meta.get("rule"), meta.get("kind"), meta.get("check")
        where = f"{suite.get('name')}: expectation {i} ({exp.get('type')})"
        if kind not in (KIND_ROW, KIND_BATCH) or not name:
            raise SuiteError(f"{where}: meta must carry kind ('row' or 'batch') and check")
        if (kind == KIND_ROW and rule not in ROW_RULES) or (kind == KIND_BATCH and rule not in BATCH_RULES):
            raise SuiteError(f"{where}: unknown {kind} rule {rule!r}")
        found.append(Check(name, rule, kind, exp["type"], dict(exp.get("kwargs") or {}),
                           meta.get("reason") or name, i))
    names = [c.name for c in found]
    if len(set(names)) != len(names):
        raise SuiteError(f"{suite.get('name')}: check names must be unique")
    return found


@cache
def _reference_parameters() -> dict[str, list]:
    return {
        "diagnosis_vocabularies": list(vocabularies.DIAGNOSIS_VOCABULARIES),
        "drug_vocabularies": list(vocabularies.DRUG_VOCABULARIES),
        "observation_categories": list(vocabularies.OBSERVATION_CATEGORIES),
    }


def suite_parameters(consortium: Consortium | None, **extra) -> dict:
    """Values the suites take at run time: reference code lists, declared purposes, batch figures."""
    params: dict = dict(_reference_parameters())
    params["purposes"] = sorted(consortium.purposes) if consortium is not None else []
    params.setdefault(PARAM_MIN_ROW_COUNT, 0)
    params.update(extra)
    return params


def _resolve(value, params: dict):
    if isinstance(value, dict) and set(value) == {"$PARAMETER"}:
        try:
            return params[value["$PARAMETER"]]
        except KeyError:
            raise SuiteError(f"suite parameter {value['$PARAMETER']!r} has no value") from None
    return value


def with_reference_columns(staged: DataFrame, dataset: str, birth_years: DataFrame | None = None,
                           staged_columns: list[str] | None = None) -> DataFrame:
    """Staged rows plus the helper columns some expectations compare with (see :data:`HELPER_COLUMNS`).

    ``birth_years`` (``person_id, _birth_year``) gives encounters their patient's year of birth.
    ``staged_columns``, when the caller knows them, spares a schema request to Spark.
    """
    columns = list(staged_columns) if staged_columns is not None else staged.columns
    if dataset == "encounter":
        if birth_years is None:
            birth_years = _no_birth_years(staged.sparkSession)
        # A visit reason is a code like a diagnosis's: checked for its pattern and check digit alike.
        reason = vocabularies.well_formed(F.col("visit_reason_source_vocabulary"), F.col("visit_reason_source_value"))
        return staged.join(birth_years, on="person_id", how="left").select(
            *columns, "_birth_year", reason.alias("_reason_well_formed"))
    if dataset not in CODED:
        return staged
    spark = staged.sparkSession
    code, vocabulary = (F.col(c) for c in CODED[dataset])
    listed = _listed_codes(spark, dataset)
    coded = (staged.join(F.broadcast(listed), on=[staged[c] == listed[f"_l{i}"] for i, c in
                                                  enumerate(CODED[dataset])], how="left")
             .select(*columns,
                     vocabularies.well_formed(vocabulary, code).alias("_code_well_formed"),
                     F.when(code.isNotNull(), F.col("_listed").isNotNull()).alias("_code_in_reference")))
    if dataset != "lab_result":
        return coded
    bounds = spark.createDataFrame(
        [(t.code, unit, factor, t.plausible_low, t.plausible_high)
         for t in reference.loinc().values() for unit, factor in units.conversions_to(t.unit, t.code).items()],
        "_b_code string, _b_unit string, _factor double, _ref_plausible_low double, _ref_plausible_high double")
    unit = F.lower(F.regexp_replace(F.regexp_replace(F.trim("unit_source_value"), "[µμ]", "u"), "\\^", "*"))
    with_unit = coded.withColumn("_unit_key", F.regexp_replace(unit, " ", ""))
    joined = with_unit.join(F.broadcast(bounds), on=(with_unit["measurement_source_value"] == bounds["_b_code"])
                            & (with_unit["_unit_key"] == bounds["_b_unit"]), how="left")
    # A unit with no known conversion leaves the bounds unset: not applied, counted, never a rejection.
    return joined.select(*columns, *CODE_HELPERS, "_ref_plausible_low", "_ref_plausible_high",
                         (F.col("value_as_number") * F.col("_factor")).alias("_value_in_reference_unit"))


def _listed_codes(spark: SparkSession, dataset: str) -> DataFrame:
    """``(code, vocabulary)`` pairs of the reference overlay for one coded dataset."""
    if dataset == "diagnosis":
        pairs = [(c, "ICD10CA") for c in reference.icd10ca()]
    elif dataset == "lab_result":
        pairs = [(c, "LOINC") for c in reference.loinc()]
    else:
        vocabulary = {s.name: s.vocabulary for s in vocabularies.SYSTEMS}  # drugs.csv names known systems only
        pairs = [(c, vocabulary[d.system]) for c, d in reference.drugs().items()]
    return spark.createDataFrame([(c, v, True) for c, v in pairs], "_l0 string, _l1 string, _listed boolean")


def _information_aggs(dataset: str) -> list[Column]:
    """Rows that landed with something to know: a well-formed code missing from the reference
    list, a lab value whose unit has no conversion to its test's bounds (bound not applied)."""
    if dataset not in CODED:
        return []
    kept = F.col("_rule").isNull()
    aggs = [F.sum((kept & (F.col("_code_in_reference") == F.lit(False))).cast("long")).alias(INFO_NOT_IN_REFERENCE)]
    if dataset == "lab_result":
        listed = F.col("_code_in_reference") & F.col("value_as_number").isNotNull()
        aggs.append(F.sum((kept & listed & F.col("_ref_plausible_low").isNull()).cast("long"))
                    .alias(INFO_BOUND_NOT_APPLIED))
    return aggs


def _information_names(dataset: str) -> tuple[str, ...]:
    """The names :func:`_information_aggs` gives ``dataset``, in :data:`INFORMATION_NAMES`' order."""
    if dataset not in CODED:
        return ()
    return (INFO_NOT_IN_REFERENCE, INFO_BOUND_NOT_APPLIED) if dataset == "lab_result" else (INFO_NOT_IN_REFERENCE,)


def _no_birth_years(spark: SparkSession) -> DataFrame:
    return spark.createDataFrame([], "person_id string, _birth_year int")


def birth_years(spark: SparkSession, lake: Lake, establishment_id: str, batch_id: str) -> DataFrame:
    """Year of birth per person, from silver and from this batch's patients (``person_id, _birth_year``)."""
    parts = []
    if table_exists(spark, lake.silver("patient")):
        parts.append(spark.read.format("delta").load(lake.silver("patient")).select("person_id", "year_of_birth"))
    if table_exists(spark, lake.staged("patient")):
        parts.append(spark.read.format("delta").load(lake.staged("patient"))
                     .where(_batch_filter(establishment_id, batch_id)).select("person_id", "year_of_birth"))
    if not parts:
        return _no_birth_years(spark)
    rows = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
    # Establishments (or a defective row of this batch) may disagree: the earliest year is the
    # conservative one, an encounter is only implausible before every year given for the person.
    return (rows.where(F.col("person_id").isNotNull() & F.col("year_of_birth").isNotNull())
            .groupBy("person_id").agg(F.min("year_of_birth").cast("int").alias("_birth_year")))


# ------------------------------------------------- Spark translation ----

def _row_condition(kwargs: dict) -> Column:
    condition = kwargs.get("row_condition")
    if condition is None:
        return F.lit(True)
    if kwargs.get("condition_parser") != "spark":
        raise SuiteError(f"row conditions must use condition_parser 'spark', not {kwargs.get('condition_parser')!r}")
    if isinstance(condition, dict):
        condition = condition.get("pass_through_filter")
    if not isinstance(condition, str):
        raise SuiteError(f"unsupported row condition {kwargs.get('row_condition')!r}")
    return F.coalesce(F.expr(condition), F.lit(False))


def check_failure(check: Check, params: dict) -> Column:
    """A boolean column, true where the row breaks the expectation, with GX's semantics.

    GX ignores null values in column map expectations (except the not-null
    ones) and, with ``ignore_row_if='either_value_is_missing'``, rows where one
    of a pair is null; the translation does the same so that both count alike.
    """
    k = check.kwargs
    cond = _row_condition(k)
    if check.type == "expect_column_values_to_not_be_null":
        return cond & F.col(k["column"]).isNull()
    if check.type == "expect_column_values_to_be_in_set":
        col, values = F.col(k["column"]), list(_resolve(k["value_set"], params))
        return cond & col.isNotNull() & ~col.isin(values)
    if check.type == "expect_column_values_to_match_regex":
        col = F.col(k["column"])
        return cond & col.isNotNull() & ~F.coalesce(col.rlike(k["regex"]), F.lit(False))
    if check.type == "expect_column_values_to_be_between":
        if k.get("strict_min") or k.get("strict_max"):
            raise SuiteError(f"{check.name}: strict bounds are not supported")
        col, low, high = F.col(k["column"]), _resolve(k.get("min_value"), params), _resolve(k.get("max_value"), params)
        outside = F.lit(False)
        if low is not None:
            outside = outside | (col < F.lit(low))
        if high is not None:
            outside = outside | (col > F.lit(high))
        return cond & col.isNotNull() & outside
    if check.type == "expect_column_pair_values_a_to_be_greater_than_b":
        if k.get("ignore_row_if") != "either_value_is_missing":
            raise SuiteError(f"{check.name}: only ignore_row_if='either_value_is_missing' is supported")
        a, b = F.col(k["column_A"]), F.col(k["column_B"])
        holds = (a >= b) if k.get("or_equal") else (a > b)
        return cond & a.isNotNull() & b.isNotNull() & ~holds
    if check.type == "expect_column_values_to_be_unique":
        col = F.col(k["column"])
        seen = F.count(F.when(cond & col.isNotNull(), F.lit(1))).over(Window.partitionBy(col))
        return cond & col.isNotNull() & (seen > 1)
    if check.type == "unexpected_rows_expectation":
        query = k["unexpected_rows_query"]
        if not query.startswith(_UNEXPECTED_ROWS_PREFIX):
            raise SuiteError(f"{check.name}: unexpected_rows_query must read {_UNEXPECTED_ROWS_PREFIX!r}<predicate>")
        return F.coalesce(F.expr(query.removeprefix(_UNEXPECTED_ROWS_PREFIX)), F.lit(False))
    raise SuiteError(f"{check.name}: expectation type {check.type} has no Spark translation")


def _reason(check: Check) -> Column:
    """The quarantine reason; parse rules name the columns that did not parse (names only, no value)."""
    prefix = {"conformance.date": "date:", "conformance.number": "number:",
              "conformance.coded_field": "coded:"}.get(check.rule)
    if prefix is None:
        return F.lit(check.reason)
    columns = F.transform(F.filter("_parse_errors", lambda e: e.startswith(prefix)),
                          lambda e: F.substring(e, len(prefix) + 1, 200))
    return F.concat(F.array_join(columns, ", "), F.lit(f": {check.reason}"))


def flag_rows(df: DataFrame, checks: list[Check], params: dict) -> DataFrame:
    """Add one boolean ``_fail_<i>`` per row-level check, and ``_rule``/``_reason`` of the first failing one."""
    row_checks = sorted((c for c in checks if c.kind == KIND_ROW), key=lambda c: c.rank)
    flags = [check_failure(c, params).alias(f"_fail_{c.position}") for c in row_checks]
    flagged = df.select("*", *flags)
    first = F.coalesce(*[F.when(F.col(f"_fail_{c.position}"), F.struct(F.lit(c.rule).alias("rule"),
                                                                        _reason(c).alias("reason")))
                         for c in row_checks]) if row_checks else F.lit(None)
    return flagged.withColumn("_first", first).select(
        "*", F.col("_first.rule").alias("_rule"), F.col("_first.reason").alias("_reason")).drop("_first")


@dataclass(frozen=True)
class BatchCounts:
    """What one aggregation over a dataset's flagged rows tells."""

    rows: int
    failures: dict[str, int]  # rows failing each row-level check, each check counted on its own
    by_rule: dict[str, int]  # rows quarantined under each rule (their first failing check's), rules with none left out
    information: dict[str, int]  # see _information_aggs
    extracted_at: dt.datetime | None


def counts_frame(flagged: DataFrame, checks: list[Check], dataset: str) -> DataFrame:
    """One row: rows, failures per check, quarantined rows per rule, information counts, extraction instant.

    The row carries its ``_dataset``, so that the frames of a batch's datasets can be unioned and
    collected in one Spark job (:func:`count_batches`); :func:`read_counts` reads it back.
    """
    row_checks = [c for c in checks if c.kind == KIND_ROW]
    rules = sorted({c.rule for c in row_checks})
    aggs = [F.count(F.lit(1)).alias("_rows"), F.max("_extracted_at").alias("_extracted_at")]
    aggs += [F.sum(F.col(f"_fail_{c.position}").cast("long")).alias(f"_check_{c.position}") for c in row_checks]
    aggs += [F.sum((F.col("_rule") == F.lit(rule)).cast("long")).alias(f"_rule_{i}") for i, rule in enumerate(rules)]
    return flagged.agg(*aggs, *_information_aggs(dataset)).select(F.lit(dataset).alias("_dataset"), "*")


def read_counts(totals: dict, checks: list[Check], dataset: str) -> BatchCounts:
    """The :class:`BatchCounts` of one row of :func:`counts_frame` (as a dict); other datasets' columns ignored."""
    row_checks = [c for c in checks if c.kind == KIND_ROW]
    rules = sorted({c.rule for c in row_checks})
    by_rule = {rule: int(totals.get(f"_rule_{i}") or 0) for i, rule in enumerate(rules)}
    return BatchCounts(
        rows=int(totals["_rows"]),
        failures={c.name: int(totals.get(f"_check_{c.position}") or 0) for c in row_checks},
        by_rule={rule: n for rule, n in by_rule.items() if n},
        information={name: int(totals[name] or 0) for name in _information_names(dataset)},
        extracted_at=totals["_extracted_at"],
    )


def count_batch(flagged: DataFrame, checks: list[Check], dataset: str) -> BatchCounts:
    """Rows, failures per check, quarantined rows per rule, information counts and extraction instant: one pass."""
    (totals,) = counts_frame(flagged, checks, dataset).collect()
    return read_counts(totals.asDict(), checks, dataset)


def count_batches(flagged: dict[str, tuple[DataFrame, list[Check]]]) -> dict[str, BatchCounts]:
    """:func:`count_batch` of every dataset of a batch (``dataset -> (flagged rows, checks)``) in one Spark job.

    Each dataset's counts are one aggregated row; their union (columns a dataset lacks left
    null) is collected once. On cached frames, that job is also the one that fills the caches.
    """
    if not flagged:
        return {}
    frames = [counts_frame(rows, checks, dataset) for dataset, (rows, checks) in flagged.items()]
    union = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), frames)
    # Columns only another dataset has come back null: read_counts looks at its own dataset's names only.
    return {r["_dataset"]: read_counts(r.asDict(), flagged[r["_dataset"]][1], r["_dataset"]) for r in union.collect()}


# -------------------------------------------------------------- GX run ----

@cache
def _gx_context():
    """The process's ephemeral GX context: built once (importing GX and building a context costs seconds)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # GX logs every expectation's defaults at INFO: noise in task logs, nothing a data engineer acts on.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False),
                               store_backend_defaults=InMemoryStoreBackendDefaults())
    return gx.get_context(mode="ephemeral", project_config=config)


@dataclass(frozen=True)
class GxResult:
    check: str
    rule: str
    kind: str
    success: bool
    unexpected_count: int | None
    element_count: int | None
    observed: str | None


# GX data sources not lent at the moment, by the Spark session they are bound to (the session itself is
# the key, so a session made after another one ended never finds its sources: each keeps its own alive).
_GX_FREE: dict[SparkSession, list] = {}
# GX's context keeps every data source's configuration: adding or removing an asset updates it.
_GX_CONFIG_LOCK = threading.Lock()
_GX_MADE = itertools.count()


def import_gx_meanwhile() -> threading.Thread:
    """Build the GX context (importing GX: seconds) in a thread while this one waits on Spark.

    The first validation of a process (every Airflow validate task) would otherwise pay GX's import
    before its first GX call, after the staged rows were read and counted. Join the thread before
    using GX; an import that fails there fails again, with its own error, on the caller's call.
    """
    thread = threading.Thread(target=_gx_context, name="gx-context", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def lent_gx_source(spark: SparkSession) -> Iterator[Any]:
    """A GX Spark datasource of the process's ephemeral context (nothing written outside the lake), bound
    to ``spark`` and lent to the caller alone until the block ends.

    GX's execution engine keeps the session its datasource was made with (a process that runs
    in-process Spark and a Spark Connect client needs one datasource each), and it keeps the batch it
    is validating: two validations at once need one datasource each. Sources are made on demand and
    kept for the session's next validations; :func:`run_gx_suite` adds one asset per validation and
    removes it afterwards, so a source holds no DataFrame between batches.
    """
    with _GX_CONFIG_LOCK:
        free = _GX_FREE.setdefault(spark, [])
        if free:
            source = free.pop()
        else:
            source = _gx_context().data_sources.add_spark(name=f"staged_{next(_GX_MADE)}")
            source._spark = spark  # noqa: SLF001 - GX's own slot for the session its engine is built with
    try:
        yield source
    finally:
        with _GX_CONFIG_LOCK:
            free.append(source)


# GX evaluates a query expectation on a temporary view of one fixed name in the batch's Spark session:
# two at once in one session would read each other's rows.
QUERY_EXPECTATIONS = frozenset({"unexpected_rows_expectation"})
_GX_QUERY_LOCK = threading.Lock()


def run_gx_suite(spark: SparkSession, df: DataFrame, dataset: str, suite: dict, params: dict) -> list[GxResult]:
    """Validate ``df`` with GX's Spark datasource; one result per expectation, in the suite's order.

    Safe to call from several threads at once, so the datasets of a batch are validated side by side
    (:func:`validate_batch`): each validation has a datasource of its own, and the suite's query
    expectations (:data:`QUERY_EXPECTATIONS`) run in a second validation, one thread's at a time, and
    ``params`` are put in place of the suite's ``$PARAMETER`` references before GX sees it.
    """
    from great_expectations.core.expectation_suite import ExpectationSuite

    # The parameters are put in place here, not by GX: its parameter parser is one object per process,
    # whose state two validations at once would share.
    expectations = [dict(e, kwargs={k: _resolve(v, params) for k, v in e["kwargs"].items()})
                    for e in suite["expectations"]]
    parts = ([e for e in expectations if e["type"] not in QUERY_EXPECTATIONS],
             [e for e in expectations if e["type"] in QUERY_EXPECTATIONS])
    asset_name = f"{dataset}_{uuid.uuid4().hex}"
    validated = []
    with lent_gx_source(spark) as source:
        with _GX_CONFIG_LOCK:
            asset = source.add_dataframe_asset(name=asset_name)
            batch = asset.add_batch_definition_whole_dataframe("batch").get_batch(batch_parameters={"dataframe": df})
        try:
            locks: tuple[contextlib.AbstractContextManager, ...] = (contextlib.nullcontext(), _GX_QUERY_LOCK)
            for part, lock in zip(parts, locks):
                if part:
                    with lock:
                        validated += batch.validate(ExpectationSuite(**dict(suite, expectations=part)),
                                                    result_format=GX_RESULT_FORMAT).results
        finally:
            with _GX_CONFIG_LOCK:
                source.delete_asset(asset_name)
    checks = {c.name: c for c in suite_checks(suite)}
    results: dict[str, GxResult] = {}
    for r in validated:
        name = r.expectation_config.meta["check"]
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise SuiteError(f"GX could not evaluate {dataset}.{name}: {r.exception_info.get('exception_message')}")
        res = r.result or {}
        observed = res.get("observed_value")
        unexpected = res.get("unexpected_count")
        if unexpected is None and checks[name].type == "unexpected_rows_expectation":
            unexpected = observed
        if unexpected is None and checks[name].kind == KIND_ROW and r.success:
            unexpected = 0  # GX reports no count when the row condition selects no row
        results[name] = GxResult(
            name, checks[name].rule, checks[name].kind, bool(r.success),
            None if unexpected is None else int(unexpected),
            None if res.get("element_count") is None else int(res["element_count"]),
            None if observed is None else json.dumps(observed, default=str),
        )
    return [results[name] for name in checks]


# ------------------------------------------------------ batch figures ----

def validated_path(lake: Lake, dataset: str) -> str:
    """Where the rows that passed validation wait for land (pseudonymised, staged schema)."""
    return f"{lake.zone(VALIDATED_ZONE)}/{dataset}"


def _batch_filter(establishment_id: str, batch_id: str) -> Column:
    return (F.col("establishment_id") == establishment_id) & (F.col("_batch_id") == batch_id)


def previous_full_batches(lake: Lake, establishment_id: str, batch_id: str) -> dict[str, tuple[str, int]]:
    """Per dataset, batch id and staged rows of the establishment's latest landed ``full`` batch.

    Read from the batch log with delta-rs (once for every dataset): the latest entry per batch,
    dataset and stage counts.
    """
    from jobs.stages.batch_queue import batch_log_entries, utc

    latest: dict[tuple[str, str, str], dict] = {}
    for entry in batch_log_entries(lake, establishment_id):  # oldest first: later entries replace earlier ones
        latest[(entry["dataset"], entry["batch_id"], entry["stage"])] = entry
    best: dict[str, tuple[tuple, dict]] = {}
    for (dataset, batch, stage), e in latest.items():
        if (stage != STAGE or batch == batch_id or e["kind"] != BatchKind.FULL
                or latest.get((dataset, batch, Stage.LAND), {}).get("status") != Status.LANDED):
            continue
        key = (e["extracted_at"] is not None, utc(e["extracted_at"]), e["batch_id"])
        if dataset not in best or key > best[dataset][0]:
            best[dataset] = (key, e)
    return {dataset: (e["batch_id"], int(e["rows_read"] or 0)) for dataset, (_, e) in best.items()}


def previous_full_rows(lake: Lake, establishment_id: str, batch_id: str, dataset: str) -> tuple[str, int] | None:
    """Batch id and staged rows of the establishment's latest landed ``full`` batch of ``dataset``."""
    return previous_full_batches(lake, establishment_id, batch_id).get(dataset)


def _table_columns(path: str) -> list[str] | None:
    """A Delta table's column names read from its log with delta-rs (no Spark job), ``None`` without a table."""
    from jobs.core.arrow_tables import open_delta

    table = open_delta(path)
    return None if table is None else [f.name for f in table.schema().fields]


def _expected_columns(lake: Lake, dataset: str, observed: list[str], allow_changes: bool) -> list[str]:
    if allow_changes:
        return sorted(observed)
    # Columns the canonical schema adds are added to silver at land (jobs.core.tables.add_missing_columns):
    # an addition is no change to stop for; a column silver has and the schema dropped still is.
    columns = list(silver_columns(dataset)) + (_table_columns(lake.silver(dataset)) or [])
    # Standard concepts are derived at land: silver has them, staged rows never do.
    columns = [c for c in columns if c not in CONCEPT_COLUMNS.get(dataset, ())]
    extra = [f.name for f in STAGED_EXTRA_FIELDS] + list(HELPER_COLUMNS.get(dataset, ()))
    return sorted(set(columns) | set(extra))


# ----------------------------------------------------- batch judgement ----
# Pure functions of the figures Spark and GX gave: what lands, what is recorded, what stops the batch.

@dataclass(frozen=True)
class DatasetJudgement:
    """What one dataset of a batch contributes: result rows, batch-rule failures and its outcome."""

    results: list[tuple]
    failures: list[BatchRuleFailure]
    outcome: DatasetValidation


def judge_dataset(dataset: str, counts: BatchCounts, gx_results: list[GxResult], *, rules,
                  previous: tuple[str, int] | None, expected_columns: list[str], ingest: tuple[int, int],
                  establishment_id: str, batch_id: str, run_at: dt.datetime) -> DatasetJudgement:
    """Compare GX's counts with the Spark translation's, and judge the batch rules of one dataset.

    ``previous`` is the previous landed full batch (id, rows) when the row-count drop applies;
    ``ingest`` the rows read and quarantined at ingest. Raises :class:`EngineDisagreement` when
    the two engines count a row-level expectation differently.
    """
    rows, key = counts.rows, (establishment_id, batch_id, dataset)
    results: list[tuple] = []
    failures: list[BatchRuleFailure] = []
    for r in gx_results:
        if r.kind == KIND_ROW and r.unexpected_count != counts.failures[r.check]:
            raise EngineDisagreement(
                f"{dataset}.{r.check}: GX counts {r.unexpected_count} failing rows, the Spark translation "
                f"{counts.failures[r.check]}. The suite uses a construct the translation reads differently; "
                "fix check_failure before validating again.")
        results.append((*key, r.check, r.rule, r.kind, r.success, r.unexpected_count,
                        r.element_count if r.element_count is not None else rows, r.observed, run_at))
        if r.kind == KIND_BATCH and not r.success:
            if r.rule == RULE_ROW_COUNT_DROP and previous is not None:
                drop = 100 * (previous[1] - rows) / previous[1]
                figures = (f"{rows} rows vs {previous[1]} in the previous full batch {previous[0]}, "
                           f"a drop of {drop:.1f}% > {rules.max_row_count_drop_pct:g}%")
            else:
                figures = f"columns {r.observed} vs silver {sorted(expected_columns)}"
            failures.append(BatchRuleFailure(dataset, r.rule, figures))

    for name, count in counts.information.items():
        results.append((*key, name, name, KIND_INFO, True, count, rows, None, run_at))

    quarantined = sum(counts.by_rule.values())
    outcome = DatasetValidation(rows, rows - quarantined, quarantined, dict(sorted(counts.by_rule.items())))

    read, ingest_q = ingest
    rejected = ingest_q + quarantined
    rate_ok = read < MIN_ROWS_FOR_RATE or 100 * rejected / read <= rules.max_quarantined_pct
    results.append((*key, "quarantined_rate", RULE_QUARANTINED_RATE, KIND_BATCH, rate_ok, rejected, read,
                    json.dumps(round(100 * rejected / read, 2) if read else 0.0), run_at))
    if not rate_ok:
        failures.append(BatchRuleFailure(
            dataset, RULE_QUARANTINED_RATE,
            f"{rejected} of {read} rows read quarantined ({ingest_q} at ingest, {quarantined} at validate), "
            f"{100 * rejected / read:.1f}% > {rules.max_quarantined_pct:g}%"))
    return DatasetJudgement(results, failures, outcome)


# ----------------------------------------------------------- transforms ----

def enriched_columns(staged_columns: list[str], dataset: str) -> list[str]:
    """The columns of :func:`with_reference_columns`' output: the staged ones and the dataset's helpers."""
    return [*staged_columns, *HELPER_COLUMNS.get(dataset, ())]


def quarantine_rows(flagged: DataFrame, dataset: str, staged_columns: list[str], now: dt.datetime) -> DataFrame:
    """The flagged rows that failed a row-level check, as quarantine rows (record without identifiers)."""
    return flagged.where(F.col("_rule").isNotNull()).select(
        F.col("establishment_id"), F.col("_batch_id").alias("batch_id"), F.lit(dataset).alias("dataset"),
        F.lit(STAGE).alias("stage"), F.col("_rule").alias("rule"), F.col("_reason").alias("reason"),
        F.col("_source_file").alias("source_file"), F.col("_source_line").alias("source_line"),
        F.col("_resource_id_hash").alias("resource_id_hash"), F.col("person_id"),
        F.to_json(F.struct(*staged_columns), {"ignoreNullFields": "false"}).alias("record_safe"),
        F.lit(now).cast("timestamp").alias("quarantined_at"),
    ).select([cast_to(F.col(f.name), f.dataType) for f in QUARANTINE_SCHEMA.fields])


def kept_rows(flagged: DataFrame, staged_columns: list[str]) -> DataFrame:
    """The flagged rows that passed every row-level check, with the staged columns only."""
    return flagged.where(F.col("_rule").isNull()).select(*staged_columns)


def validated_rows(kept: DataFrame, dataset: str) -> DataFrame:
    """``kept`` in the staged schema of ``dataset``, the validated zone's."""
    return kept.select([cast_to(F.col(f.name), f.dataType) for f in staged_schema(dataset).fields])


# ------------------------------------------------------------------ I/O ----
# The one place that reads the staged zone and writes the validated zone, quarantine and results.

def read_staged(spark: SparkSession, lake: Lake, establishment_id: str, batch_id: str,
                skip: Iterable[str] = ()) -> dict[str, tuple[DataFrame, list[str]]]:
    """Per dataset with a staged table, ``skip`` aside: the batch's staged rows and the table's columns
    (read with delta-rs)."""
    found = {}
    skipped = set(skip)
    for dataset in (d for d in DATASETS if d not in skipped):
        path = lake.staged(dataset)
        columns = _table_columns(path)
        if columns is None:
            continue
        found[dataset] = (spark.read.format("delta").load(path).where(_batch_filter(establishment_id, batch_id)),
                          columns)
    return found


def _ensure(spark: SparkSession, path: str, schema: StructType, comment: str,
            partition_by: tuple[str, ...] = ("establishment_id",)) -> None:
    """Create the table once; a table that already has every column of ``schema`` costs no Spark call."""
    present = _table_columns(path)
    if present is not None and not {f.name for f in schema.fields} - set(present):
        return
    ensure_table(spark, path, schema, partition_by=partition_by, comment=comment)


def write_validation(spark: SparkSession, lake: Lake, establishment_id: str, batch_id: str, results: list[tuple],
                     quarantine: DataFrame, validated: dict[str, DataFrame]) -> None:
    """Replace the batch's results, validate-stage quarantine rows and validated rows: one commit per table,
    the tables written side by side (:func:`jobs.core.tables.on_each_table`)."""
    batch = {"establishment_id": establishment_id, "batch_id": batch_id}
    path = lake.ops(VALIDATION_RESULTS)
    _ensure(spark, path, VALIDATION_RESULTS_SCHEMA,
            "Great Expectations results per batch, dataset and expectation (counts only, no values).")
    writes = {path: partial(replace_rows, spark.createDataFrame(results, VALIDATION_RESULTS_SCHEMA), path, batch)}

    qpath = lake.quarantine()
    _ensure(spark, qpath, QUARANTINE_SCHEMA,
            "Rejected rows (no identifier) with the stage, rule and reason that rejected them.")
    writes[qpath] = partial(replace_rows, quarantine, qpath, batch | {"stage": STAGE})

    for dataset, rows in validated.items():
        vpath = validated_path(lake, dataset)
        _ensure(spark, vpath, staged_schema(dataset), f"Validated {dataset} rows waiting for land (pseudonymised).",
                TRANSIENT_PARTITIONS)
        writes[vpath] = partial(replace_rows, rows, vpath, {"establishment_id": establishment_id, "_batch_id": batch_id})
    on_each_table(writes)


# ---------------------------------------------------------------- entry ----

@dataclass
class _Prepared:
    """One staged dataset of the batch, flagged and cached, waiting for its counts and GX."""

    staged_columns: list[str]
    suite: dict
    checks: list[Check]
    rules: Any
    flagged: DataFrame


@writes_lake(Mode.SHARED)
def validate_batch(spark: SparkSession, lake: Lake, consortium: Consortium, establishment_id: str,
                   batch_id: str, batch_kind: str) -> ValidationOutcome:
    """Validate every staged dataset of one batch; quarantine failing rows, keep the others for land.

    ``batch_kind`` is ``full`` or ``incremental`` (the manifest's ``kind``, see
    :func:`jobs.stages.ingest.batch_kind`): only a full batch is compared with the
    previous full batch's row count. Re-running replaces the batch's
    validate-stage quarantine rows, validated rows and results. Raises
    :class:`BatchRejected` when a batch-level rule fails; the batch's validated
    rows are then removed so that land has nothing to take.

    Each dataset's flagged rows are checkpointed once; one Spark job counts every dataset of the
    batch, GX validates the cached rows, and each table written takes one commit.
    """
    batch_kind = BatchKind(batch_kind)
    run_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    from jobs.stages.batch_queue import ingested_entries

    # (rows read, rows quarantined at ingest) per dataset of the batch.
    ingest = {dataset: (int(e["rows_read"] or 0), int(e["rows_quarantined"] or 0))
              for dataset, e in ingested_entries(lake, establishment_id, batch_id).items()}
    previous_full = previous_full_batches(lake, establishment_id, batch_id) if batch_kind == BatchKind.FULL else {}
    params = suite_parameters(consortium)

    results: list[tuple] = []
    outcomes: dict[str, DatasetValidation] = {}
    failures: list[BatchRuleFailure] = []
    quarantine_parts: list[DataFrame] = []
    kept: dict[str, DataFrame] = {}
    prepared: dict[str, _Prepared] = {}
    gx_ready = import_gx_meanwhile()
    try:
        # A dataset whose every row read was quarantined at ingest (an incremental batch's empty files) has
        # nothing staged: no Spark job looks for its rows, and its outcome is zeros (below).
        nothing_staged = [d for d, (read, quarantined) in ingest.items() if read <= quarantined]
        for dataset, (staged, staged_columns) in read_staged(spark, lake, establishment_id, batch_id,
                                                             nothing_staged).items():
            suite = load_suite(dataset)
            checks = suite_checks(suite)
            years = birth_years(spark, lake, establishment_id, batch_id) if dataset == "encounter" else None
            # One checkpointed frame per dataset: the row checks' flags on the enriched rows; GX reads its
            # enriched columns. A local checkpoint, not a cache: each of GX's few dozen queries then sends and
            # analyses a plan of one node instead of the enrichment's joins and every check's expression (half
            # of GX's time on a small batch). Computed once, by the first Spark job (count_batches).
            flagged = flag_rows(with_reference_columns(staged, dataset, years, staged_columns), checks, params)
            prepared[dataset] = _Prepared(staged_columns, suite, checks,
                                          consortium.batch_rules(establishment_id, dataset),  # overrides applied
                                          flagged)
        # Each checkpoint is a round trip in which Spark analyses the dataset's plan: side by side.
        for dataset, checkpointed in on_each_table({
                d: partial(p.flagged.localCheckpoint, eager=False, storageLevel=StorageLevel.MEMORY_AND_DISK)
                for d, p in prepared.items()}).items():
            prepared[dataset].flagged = checkpointed
        counts = count_batches({d: (p.flagged, p.checks) for d, p in prepared.items()})
        gx_ready.join()

        # GX validates the datasets side by side (each a few dozen small Spark queries: their round trips
        # overlap), then each is judged in the batch's order.
        to_judge = {}
        gx_runs = {}
        for dataset, p in prepared.items():
            if counts[dataset].rows == 0:
                continue
            previous = previous_full.get(dataset)
            enriched = enriched_columns(p.staged_columns, dataset)
            expected = _expected_columns(lake, dataset, enriched, p.rules.allow_column_changes)
            min_rows = previous[1] * (1 - p.rules.max_row_count_drop_pct / 100) if previous else 0
            to_judge[dataset] = (previous, expected)
            gx_runs[dataset] = partial(run_gx_suite, spark, p.flagged.select(*enriched), dataset, p.suite,
                                       suite_parameters(consortium, **{PARAM_MIN_ROW_COUNT: min_rows,
                                                                       PARAM_EXPECTED_COLUMNS: expected}))
        gx_results = on_each_table(gx_runs)
        for dataset, (previous, expected) in to_judge.items():
            p = prepared[dataset]
            judged = judge_dataset(dataset, counts[dataset], gx_results[dataset], rules=p.rules, previous=previous,
                                   expected_columns=expected, ingest=ingest.get(dataset, (counts[dataset].rows, 0)),
                                   establishment_id=establishment_id, batch_id=batch_id, run_at=run_at)
            results += judged.results
            failures += judged.failures
            outcomes[dataset] = judged.outcome
            quarantine_parts.append(quarantine_rows(p.flagged, dataset, p.staged_columns, run_at))
            kept[dataset] = kept_rows(p.flagged, p.staged_columns)

        for row, found in _mapped_shares(kept, consortium, {d: prepared[d].rules for d in kept},
                                         establishment_id, batch_id, run_at):
            results.append(row)
            failures += found
        # Datasets whose every row was quarantined at ingest still get a validate entry, so land sees them.
        for dataset in ingest:
            outcomes.setdefault(dataset, DatasetValidation(0, 0, 0))

        quarantine = reduce(DataFrame.unionByName, quarantine_parts, spark.createDataFrame([], QUARANTINE_SCHEMA))
        # A stopped batch leaves nothing for land: its validated rows are replaced by none.
        validated = {d: validated_rows(spark.createDataFrame([], staged_schema(d)) if failures else rows, d)
                     for d, rows in kept.items()}
        write_validation(spark, lake, establishment_id, batch_id, results, quarantine, validated)
    finally:
        # The checkpoints are released with their frames (Spark Connect: at once; in-process: Spark's cleaner).
        prepared.clear()

    from jobs.stages.reports import write_validation_report

    report = write_validation_report(spark, lake, establishment_id, batch_id, batch_kind, run_at,
                                     results, failures, outcomes)
    status = Status.STOPPED if failures else Status.VALIDATED
    failure_text = {f.dataset: str(f) for f in failures}
    append_batch_log(spark, lake, [
        {"establishment_id": establishment_id, "batch_id": batch_id, "dataset": dataset, "stage": STAGE,
         "status": status, "rows_read": o.rows, "rows_quarantined": o.quarantined,
         "extracted_at": counts[dataset].extracted_at if dataset in counts else None, "kind": batch_kind,
         "message": f"{o.valid} valid, {o.quarantined} quarantined"
                    + (f"; {failure_text[dataset]}" if dataset in failure_text else "") + f"; report {report}"}
        for dataset, o in outcomes.items()
    ])
    if failures:
        raise rules_failed(establishment_id, batch_id, failures)
    return ValidationOutcome(establishment_id, batch_id, batch_kind.value, outcomes, report, run_at.isoformat())


# ---------------------------------------------------------- terminology ----


def _mapped_shares(kept: dict[str, DataFrame], consortium: Consortium, rules: dict, establishment_id: str,
                   batch_id: str, run_at: dt.datetime) -> list[tuple[tuple, list[BatchRuleFailure]]]:
    """Per measured dataset, the batch's terminology coverage (concepts derived as land will) as a result
    row, and the ``batch.mapped_share`` failure when less than ``min_mapped_pct`` of its source values
    map. One Spark job for every dataset of the batch."""
    from jobs.terminology.concepts import with_concepts
    from jobs.terminology.coverage import MEASURED_DATASETS, summarise, value_counts

    if consortium.terminology is None:
        return []
    measured = [d for d in kept if d in MEASURED_DATASETS]
    if not measured:
        return []
    frames = [value_counts(with_concepts(kept[d], d, consortium.terminology), d)
              .select(F.lit(d).alias("_dataset"), "*") for d in measured]
    per_value: dict[str, list] = {d: [] for d in measured}
    for r in reduce(DataFrame.unionByName, frames).collect():
        per_value[r["_dataset"]].append(r)
    found = []
    for dataset in measured:
        shares = summarise(per_value[dataset], dataset, consortium.pipeline.min_cell_size)
        if not shares:
            continue
        (c,) = shares
        min_mapped_pct = rules[dataset].min_mapped_pct
        # Like the quarantined share, a mapped share over a handful of rows says nothing.
        ok = c.rows < MIN_ROWS_FOR_RATE or c.row_share >= min_mapped_pct
        observed = json.dumps({"rows_mapped_pct": round(c.row_share, 2), "values_mapped": c.values_mapped,
                               "values": c.values,
                               # Reports hold counts, not row values: an unmapped source value is named only when
                               # at least min_cell_size rows share it (a code, not something typed once into a field).
                               "unmapped": [[v, n] for v, n in c.unmapped if n is not None]})
        row = (establishment_id, batch_id, dataset, "mapped_share", RULE_MAPPED_SHARE, KIND_BATCH, ok,
               c.rows - c.rows_mapped, c.rows, observed, run_at)
        failures = [] if ok else [BatchRuleFailure(
            dataset, RULE_MAPPED_SHARE, f"{c.rows_mapped} of {c.rows} rows with a source value map to a standard "
                                        f"concept, {c.row_share:.1f}% < {min_mapped_pct:g}%; add the unmapped "
                                        "values to a map under config/terminology/ (affluent mapping coverage)")]
        found.append((row, failures))
    return found


# ------------------------------------------------------------ benchmark ----

def measure_engines(spark: SparkSession, staged: DataFrame, dataset: str,
                    consortium: Consortium | None = None) -> dict[str, float]:
    """Seconds each engine takes to evaluate the dataset's row-level expectations on ``staged``.

    ``gx``: a GX validation with the Spark datasource (counts per expectation,
    no row-level flags). ``spark``: the generated expressions, one pass that
    gives each row its rule plus the same counts. The staged rows are cached
    first so that both read the same in-memory data.
    """
    suite = load_suite(dataset)
    checks = suite_checks(suite)
    row_suite = dict(suite, expectations=[e for e in suite["expectations"] if e["meta"]["kind"] == KIND_ROW])
    params = suite_parameters(consortium)
    df = with_reference_columns(staged, dataset).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        df.count()
        started = time.perf_counter()
        run_gx_suite(spark, df, dataset, row_suite, params)
        gx_seconds = time.perf_counter() - started
        started = time.perf_counter()
        count_batch(flag_rows(df, checks, params), checks, dataset)
        spark_seconds = time.perf_counter() - started
    finally:
        df.unpersist()
    return {"gx": gx_seconds, "spark": spark_seconds}
