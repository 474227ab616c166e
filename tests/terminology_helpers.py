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


# Optional silver columns a test's tuples may leave out (null in every row): the facts few tests are about.
OPTIONAL_COLUMNS = {
    "encounter": ("visit_reason_source_value", "visit_reason_source_vocabulary"),
    "diagnosis": ("condition_end_date",),
    "lab_result": ("value_as_concept", "category"),
    "medication": ("drug_dispense_date",),
}


def silver_frame(spark, dataset: str, rows: list[tuple]) -> DataFrame:
    """Silver rows of ``dataset`` from tuples of its source columns, with the shipped maps' concepts.

    Tuples give every source column, or every one but :data:`OPTIONAL_COLUMNS` (then null).
    """
    from pyspark.sql import functions as F

    from jobs.terminology.concepts import with_concepts

    schema = source_schema(dataset)
    optional = OPTIONAL_COLUMNS.get(dataset, ())
    if rows and len(rows[0]) == len(schema.fields) - len(optional):
        given = StructType([f for f in schema.fields if f.name not in optional])
        df = spark.createDataFrame(rows, given).select(
            *[F.col(f.name) if f.name not in optional else F.lit(None).cast(f.dataType).alias(f.name)
              for f in schema.fields])
    else:
        df = spark.createDataFrame(rows, schema)
    return with_concepts(df, dataset, shipped_terminology()).select(*SILVER_SCHEMAS[dataset].fieldNames())
