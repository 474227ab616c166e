"""Gold indicators: population counts with small-cell suppression.

``gold.patients_by_condition`` counts distinct persons per condition group,
postal prefix (FSA / département) and year of ``condition_start_date``.

Who counts: gold is read by researchers of any project, so it is built for
the consortium's general research purpose (:data:`GOLD_PURPOSE`,
``research_general``): only persons whose consent allows it on the publish
date, and only data of establishments whose sharing agreement covers both
``diagnosis`` and ``patient`` for that purpose.

Condition groups come from ``jobs/reference/icd10ca.csv`` (exact code, then
its three-character category); a code the list does not map, or every code
when the file is absent, falls back to its ICD-10 chapter letter (``E``).
Only ICD-10 / ICD-10-CA diagnoses count (other vocabularies have no chapter).

Suppression: a cell under the threshold (11 by default) is published as
null with ``suppressed = true``. Secondary suppression then makes sure no
suppressed cell can be derived by subtraction from a total: along every line
of the cube (all postal prefixes of one group and year, all years of one
group and prefix, all groups of one prefix and year), a line holding exactly
one suppressed cell gets its smallest remaining cell suppressed too, until no
line changes.
"""

from __future__ import annotations

import csv
import datetime as dt
from itertools import combinations
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from jobs.core.config import Consortium
from jobs.privacy.consent import consented_persons
from jobs.core.lake import Lake
from jobs.privacy.policy import PolicyError, establishments_sharing
from jobs.core.schemas import SILVER_SCHEMAS
from jobs.terminology.maps import NO_CONCEPT
from jobs.core.tables import overwrite_table, table_exists

PATIENTS_BY_CONDITION = "patients_by_condition"
GOLD_PURPOSE = "research_general"
DEFAULT_THRESHOLD = 11
ICD10_REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "icd10ca.csv"
ICD10_VOCABULARIES = ("ICD10", "ICD10CA")
CELL_DIMENSIONS = ("condition_group", "postal_prefix", "year")
COUNT_COLUMN = "patients"
MAX_SECONDARY_PASSES = 50

_REFERENCE_SCHEMA = StructType([
    StructField("code_key", StringType(), False),
    StructField("condition_group", StringType(), False),
])


def _code_key(col):
    return F.upper(F.regexp_replace(col, r"[^A-Za-z0-9]", ""))


def condition_reference(spark: SparkSession, path: Path = ICD10_REFERENCE) -> DataFrame | None:
    """(code_key, condition_group) from the reference list, or None when the file is absent."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as handle:
        rows = [(r["code"], r["condition_group"]) for r in csv.DictReader(handle)
                if r.get("code") and r.get("condition_group")]
    keyed = [("".join(ch for ch in code.upper() if ch.isalnum()), group) for code, group in rows]
    return spark.createDataFrame(keyed, _REFERENCE_SCHEMA)


def with_condition_group(diagnosis: DataFrame, reference: DataFrame | None) -> DataFrame:
    """Add ``condition_group``: exact code, then its category, then the chapter letter."""
    key = _code_key(F.col("condition_source_value"))
    chapter = F.substring(key, 1, 1)
    df = diagnosis.withColumn("_code_key", key)
    if reference is None:
        return df.withColumn("condition_group", chapter).drop("_code_key")
    exact = reference.select(F.col("code_key").alias("_code_key"), F.col("condition_group").alias("_exact"))
    category = (reference.groupBy(F.substring("code_key", 1, 3).alias("_category"))
                .agg(F.min("condition_group").alias("_by_category")))
    return (
        df.join(F.broadcast(exact), on="_code_key", how="left")
        .join(F.broadcast(category), on=F.substring(F.col("_code_key"), 1, 3) == F.col("_category"), how="left")
        .withColumn("condition_group", F.coalesce("_exact", "_by_category", chapter))
        .drop("_code_key", "_exact", "_category", "_by_category")
    )


def latest_postal_prefix(patient: DataFrame) -> DataFrame:
    """One postal prefix per person: from the most recently extracted patient record."""
    latest = Window.partitionBy("person_id").orderBy(
        F.col("_extracted_at").desc_nulls_last(), F.col("establishment_id"), F.col("patient_key"))
    return (patient.withColumn("_rank", F.row_number().over(latest))
            .where(F.col("_rank") == 1).select("person_id", "postal_prefix"))


def count_patients_by_condition(diagnosis: DataFrame, patient: DataFrame, persons: DataFrame,
                                reference: DataFrame | None) -> DataFrame:
    """Distinct consenting persons per (condition_group, postal_prefix, year); no suppression yet."""
    icd = F.upper(F.regexp_replace(F.col("condition_source_vocabulary"), r"[^A-Za-z0-9]", ""))
    coded = diagnosis.where(icd.isin(*ICD10_VOCABULARIES) & F.col("condition_source_value").isNotNull())
    if "condition_concept_code" in diagnosis.columns:
        # The ICD-10 category standard concept: SNOMED CT diagnoses count through their map too.
        coded = (diagnosis.where(F.col("condition_concept_code") != NO_CONCEPT)
                 .withColumn("condition_source_value", F.col("condition_concept_code")))
    facts = (
        coded
        .join(persons, on="person_id", how="left_semi")
        .transform(lambda df: with_condition_group(df, reference))
        .join(latest_postal_prefix(patient), on="person_id", how="left")
    )
    return (
        facts.groupBy("condition_group", "postal_prefix", F.year("condition_start_date").alias("year"))
        .agg(F.countDistinct("person_id").alias(COUNT_COLUMN))
    )


def _secondary_pass(cells: DataFrame, dims: tuple[str, ...]) -> DataFrame:
    for line in combinations(dims, len(dims) - 1):
        across = [d for d in dims if d not in line]
        whole_line = Window.partitionBy(*line)
        smallest_open_first = Window.partitionBy(*line).orderBy(
            F.col("suppressed").asc(), F.col("_n").asc(), *[F.col(d).asc_nulls_first() for d in across])
        cells = (
            cells.withColumn("_line_suppressed", F.sum(F.col("suppressed").cast("int")).over(whole_line))
            .withColumn("_order", F.row_number().over(smallest_open_first))
            .withColumn("suppressed", F.col("suppressed")
                        | ((F.col("_line_suppressed") == 1) & (F.col("_order") == 1)))
            .drop("_line_suppressed", "_order")
        )
    return cells


def suppress_small_cells(cells: DataFrame, threshold: int = DEFAULT_THRESHOLD,
                         dims: tuple[str, ...] = CELL_DIMENSIONS, count_column: str = COUNT_COLUMN) -> DataFrame:
    """Primary (count < threshold) and secondary suppression; suppressed counts become null.

    Returns the cells with ``count_column`` nulled where ``suppressed`` is true.
    """
    current = cells.withColumn("_n", F.col(count_column)).withColumn("suppressed", F.col("_n") < F.lit(threshold))
    current = current.localCheckpoint()
    suppressed = current.where("suppressed").count()
    for _ in range(MAX_SECONDARY_PASSES):
        current = _secondary_pass(current, dims).localCheckpoint()
        now = current.where("suppressed").count()
        if now == suppressed:
            break
        suppressed = now
    else:
        raise RuntimeError("secondary suppression did not converge; refusing to publish the indicator")
    return (current.withColumn(count_column, F.when(~F.col("suppressed"), F.col("_n")).cast("long"))
            .drop("_n"))


def _silver(spark: SparkSession, lake: Lake, dataset: str) -> DataFrame:
    path = lake.silver(dataset)
    if table_exists(spark, path):
        return spark.read.format("delta").load(path)
    return spark.createDataFrame([], SILVER_SCHEMAS[dataset])


def build_patients_by_condition(spark: SparkSession, lake: Lake, consortium: Consortium, on_date: dt.date,
                                threshold: int = DEFAULT_THRESHOLD,
                                silver: dict[str, DataFrame] | None = None,
                                reference_path: Path = ICD10_REFERENCE) -> int:
    """Recompute ``gold.patients_by_condition`` from silver (overwrite); return the number of cells.

    ``silver`` lets the publish job pass the exact silver snapshots it read.
    """
    purpose = consortium.purposes.get(GOLD_PURPOSE)
    if purpose is None:
        raise PolicyError(f"gold needs the purpose {GOLD_PURPOSE!r}; declare it in purposes.yaml")
    silver = silver or {d: _silver(spark, lake, d) for d in ("patient", "diagnosis", "consent")}
    dx_from = establishments_sharing(consortium, ("diagnosis",), GOLD_PURPOSE)
    pt_from = establishments_sharing(consortium, ("patient",), GOLD_PURPOSE)
    patient = silver["patient"].where(F.col("establishment_id").isin(pt_from))
    diagnosis = silver["diagnosis"].where(F.col("establishment_id").isin(dx_from))
    persons = consented_persons(spark, silver["patient"], silver["consent"], GOLD_PURPOSE, purpose.regime, on_date)
    cells = count_patients_by_condition(diagnosis, patient, persons, condition_reference(spark, reference_path))
    published = (
        suppress_small_cells(cells, threshold)
        .select(*CELL_DIMENSIONS, COUNT_COLUMN, "suppressed",
                F.lit(threshold).alias("threshold"), F.lit(on_date).alias("as_of"),
                F.current_timestamp().alias("computed_at"))
    )
    path = lake.gold(PATIENTS_BY_CONDITION)
    overwrite_table(spark, published, path)
    return spark.read.format("delta").load(path).count()
