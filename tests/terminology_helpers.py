"""Silver rows for tests: given without their standard columns, derived as land derives them."""

from __future__ import annotations

from functools import cache

from pyspark.sql import DataFrame
from pyspark.sql.types import StructType

from jobs.core.schemas import CONCEPT_COLUMNS, SILVER_SCHEMAS
from tests.conftest import CONFIG_DIR


@cache
def shipped_terminology():
    from jobs.terminology.maps import load_terminology

    return load_terminology(CONFIG_DIR)


def source_schema(dataset: str) -> StructType:
    """The silver schema without the standard columns (what a test writes tuples for)."""
    return StructType([f for f in SILVER_SCHEMAS[dataset].fields if f.name not in CONCEPT_COLUMNS.get(dataset, ())])


def silver_frame(spark, dataset: str, rows: list[tuple]) -> DataFrame:
    """Silver rows of ``dataset`` from tuples of its source columns, with the shipped maps' concepts."""
    from jobs.terminology.concepts import with_concepts

    df = spark.createDataFrame(rows, source_schema(dataset))
    return with_concepts(df, dataset, shipped_terminology()).select(*SILVER_SCHEMAS[dataset].fieldNames())
