"""Mapping coverage, as OHDSI's data-quality reports show it to stewards.

Per establishment and dataset: how many rows carrying a source value got a
standard concept (``rows_mapped / rows``), how many distinct source values did
(``values_mapped / values``), and the most frequent unmapped source values with
their row counts, a count under the consortium's minimum cell size shown as
suppressed (``None``). A row without a source value (no sex recorded, a
qualitative lab result) has nothing to map and is not counted.

What counts as a source value and as mapped (:data:`MEASURES`):

- patient, encounter: the value as recorded; mapped when the concept id is not 0;
- diagnosis, medication: ``<vocabulary>:<code>``; mapped when the concept code is not '0';
- lab_result: ``<LOINC> <unit>`` of numeric results; mapped when the unit converted.

Example::

    for c in coverage(spark.read.format("delta").load(lake.silver("encounter")), "encounter", 11):
        print(c.establishment_id, c.row_share, c.unmapped)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.terminology.maps import NO_CONCEPT

DEFAULT_TOP = 10


def _measures() -> dict[str, tuple[Column, Column]]:
    col = F.col
    return {
        "patient": (col("gender_source_value"), col("gender_concept_id") != 0),
        "encounter": (col("visit_source_value"), col("visit_concept_id") != 0),
        "diagnosis": (F.concat_ws(":", col("condition_source_vocabulary"), col("condition_source_value")),
                      col("condition_concept_code") != NO_CONCEPT),
        "medication": (F.concat_ws(":", col("drug_source_vocabulary"), col("drug_source_value")),
                       col("drug_concept_code") != NO_CONCEPT),
        "lab_result": (F.when(col("unit_concept_code").isNotNull(),
                              F.concat_ws(" ", col("measurement_source_value"),
                                          F.coalesce(col("unit_source_value"), F.lit("(no unit)")))),
                       col("unit_concept_code") != NO_CONCEPT),
    }


MEASURED_DATASETS = ("patient", "encounter", "diagnosis", "lab_result", "medication")


@dataclass(frozen=True)
class Coverage:
    establishment_id: str
    dataset: str
    rows: int
    rows_mapped: int
    values: int
    values_mapped: int
    # (source value, rows) of the most frequent unmapped values; rows None when under the minimum cell size.
    unmapped: tuple[tuple[str, int | None], ...] = ()

    @property
    def row_share(self) -> float:
        return 100.0 * self.rows_mapped / self.rows if self.rows else 100.0

    @property
    def value_share(self) -> float:
        return 100.0 * self.values_mapped / self.values if self.values else 100.0


def source_and_mapped(df: DataFrame, dataset: str) -> DataFrame:
    """``establishment_id, _source, _mapped`` of the rows of ``df`` that carry a source value."""
    source, mapped = _measures()[dataset]
    return (df.select("establishment_id", source.alias("_source"), F.coalesce(mapped, F.lit(False)).alias("_mapped"))
            .where(F.col("_source").isNotNull() & (F.col("_source") != "")))


def coverage(df: DataFrame, dataset: str, min_cell_size: int, top: int = DEFAULT_TOP) -> list[Coverage]:
    """Coverage of ``df`` (rows of ``dataset`` with their concept columns), one per establishment."""
    if dataset not in MEASURED_DATASETS:
        return []
    return summarise(value_counts(df, dataset).collect(), dataset, min_cell_size, top)


def value_counts(df: DataFrame, dataset: str) -> DataFrame:
    """``establishment_id, _source, _mapped, _rows``: rows per source value, the figures :func:`summarise` reads.

    A frame rather than a collected list, so that a caller measuring several datasets can union
    them and collect once.
    """
    return (source_and_mapped(df, dataset).groupBy("establishment_id", "_source", "_mapped")
            .agg(F.count(F.lit(1)).alias("_rows")))


def summarise(per_value: Iterable, dataset: str, min_cell_size: int, top: int = DEFAULT_TOP) -> list[Coverage]:
    """Coverage per establishment from the rows of :func:`value_counts` (``Row``s of one dataset)."""
    found: dict[str, dict] = {}
    for r in per_value:
        c = found.setdefault(r.establishment_id, {"rows": 0, "mapped": 0, "values": 0, "values_mapped": 0,
                                                  "unmapped": []})
        c["rows"] += r._rows
        c["values"] += 1
        if r._mapped:
            c["mapped"] += r._rows
            c["values_mapped"] += 1
        else:
            c["unmapped"].append((r._source, r._rows))
    out = []
    for est, c in sorted(found.items()):
        worst = sorted(c["unmapped"], key=lambda v: (-v[1], v[0]))[:top]
        shown = tuple((value, n if n >= min_cell_size else None) for value, n in worst)
        out.append(Coverage(est, dataset, c["rows"], c["mapped"], c["values"], c["values_mapped"], shown))
    return out


def render(coverages: list[Coverage], min_cell_size: int) -> str:
    """Plain-text table for the command line."""
    lines = [f"{'establishment':<22} {'dataset':<11} {'rows mapped':>20} {'values mapped':>18}  most frequent unmapped"]
    for c in coverages:
        unmapped = ", ".join(f"{v} ({n if n is not None else f'<{min_cell_size}'})" for v, n in c.unmapped) or "-"
        lines.append(f"{c.establishment_id:<22} {c.dataset:<11} "
                     f"{f'{c.rows_mapped}/{c.rows} {c.row_share:5.1f}%':>20} "
                     f"{f'{c.values_mapped}/{c.values} {c.value_share:5.1f}%':>18}  {unmapped}")
    return "\n".join(lines)
