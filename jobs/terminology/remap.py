"""Re-derive silver's standard concepts after a map changed, without re-ingesting anything.

Silver keeps every source column the concepts come from, so a changed
ConceptMap (or ``units.yaml``) is applied by reading silver, deriving the
concept columns again with :func:`jobs.terminology.concepts.with_concepts`
and MERGE-updating only the rows whose concept columns changed, and only those
columns: ``_extracted_at`` and ``_batch_id`` stay (the record did not change at
the source), so a later batch is still judged against the real extraction
instant. Each commit carries ``userMetadata`` naming the maps applied, so the
table's history says which remap changed what; the change feed carries the
updated rows, and the next publish rebuilds the extracts from them.

Run daily by the maintenance DAG (a no-op when nothing changed) and by
``affluent mapping remap``.

Example::

    remap_silver(spark, lake, load_terminology(Path("config")))   # {'encounter': 1260, ...}
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import reduce

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.core.lake import Lake
from jobs.core.schemas import CONCEPT_FIELDS, SILVER_KEY
from jobs.core.tables import merge_into, table_exists, update_set
from jobs.terminology.concepts import concept_columns, with_concepts
from jobs.terminology.maps import Terminology
from jobs.core.writer_lock import Mode, writes_lake

_USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"
REMAP_PREFIX = "terminology remap"


@contextmanager
def _commit_metadata(spark: SparkSession, text: str):
    """``userMetadata`` for exactly the commits inside (the setting sticks to the session)."""
    spark.conf.set(_USER_METADATA, text)
    try:
        yield
    finally:
        spark.conf.unset(_USER_METADATA)


def changed_concepts(silver: DataFrame, dataset: str, terminology: Terminology) -> DataFrame:
    """``establishment_id``, the record key and the re-derived concept columns of the rows whose
    concept columns differ from what silver holds (null-safe comparison)."""
    columns = concept_columns(dataset)
    key = SILVER_KEY[dataset]
    before = silver.select("*", *[F.col(c).alias(f"_was_{c}") for c in columns])
    derived = with_concepts(before, dataset, terminology)
    differs = reduce(lambda a, b: a | b, [~F.col(c).eqNullSafe(F.col(f"_was_{c}")) for c in columns])
    return derived.where(differs).select("establishment_id", key, *columns)


def _add_missing_columns(spark: SparkSession, path: str, dataset: str) -> None:
    """A silver table created before the concept columns existed gets them (null until remapped)."""
    present = set(spark.read.format("delta").load(path).columns)
    missing = [f for f in CONCEPT_FIELDS.get(dataset, ()) if f.name not in present]
    if missing:
        spec = ", ".join(f"{f.name} {f.dataType.simpleString()}" for f in missing)
        spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS ({spec})")


@writes_lake(Mode.SHARED)
def remap_silver(spark: SparkSession, lake: Lake, terminology: Terminology,
                 datasets: tuple[str, ...] | None = None) -> dict[str, int]:
    """Bring every silver table's concept columns in line with ``terminology``; rows updated per dataset."""
    refs = sorted(terminology.maps) + [terminology.units.map_ref]
    updated: dict[str, int] = {}
    for dataset in datasets or tuple(CONCEPT_FIELDS):
        path = lake.silver(dataset)
        if not table_exists(spark, path):
            continue
        _add_missing_columns(spark, path, dataset)
        silver = spark.read.format("delta").load(path)
        # Materialised once: the MERGE below rewrites the files this was read from.
        changes = changed_concepts(silver, dataset, terminology).localCheckpoint()
        count = changes.count()
        updated[dataset] = count
        if count == 0:
            continue
        key = SILVER_KEY[dataset]
        columns = concept_columns(dataset)
        with _commit_metadata(spark, f"{REMAP_PREFIX}: {count} row(s) re-derived with {', '.join(refs)}"):
            # The MERGE itself compares too: a row whose concepts already agree is never rewritten.
            merge_into(spark, path, changes, f"t.establishment_id = s.establishment_id AND t.{key} = s.{key}",
                       "WHEN MATCHED AND (" + " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in columns)
                       + f") THEN UPDATE SET {update_set(columns)}")
    return updated
