"""CSV extracts → bronze rows and quarantine rows, driven by the establishment's profile.

Spark's CSV reader in PERMISSIVE mode pads short rows, cuts long ones and can
drop corrupt ones silently, so lines are read first (:mod:`jobs.readers.lines`),
decoded strictly with the declared charset, and their fields counted here.
Only well-formed lines are parsed, with ``from_csv`` on each line's text.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.batchlog import Stage
from jobs.config import CsvProfile
from jobs.readers.lines import decode_strict, read_lines
from jobs.schemas import BRONZE_COLUMNS, bronze_schema

STAGE_INGEST = Stage.INGEST.value
RULE_ENCODING = "ingest.encoding"
RULE_MALFORMED = "ingest.malformed_line"
RULE_ACTION = "ingest.unknown_action"

_PY_CHARSETS = {"utf-8-sig": "utf-8-sig", "utf-8": "utf-8", "latin-1": "latin-1", "iso-8859-1": "latin-1",
                "cp1252": "cp1252", "windows-1252": "cp1252"}


class HeaderError(Exception):
    """The header line of an extract cannot be mapped to the dataset."""


@dataclass(frozen=True)
class FileLineage:
    """Where a file comes from; becomes the lineage columns of its rows."""

    establishment_id: str
    batch_id: str
    source_file: str
    extracted_at: dt.datetime
    ingested_at: dt.datetime

    def columns(self, line: Column, resource_id: Column | None = None) -> list[Column]:
        return [
            F.lit(self.establishment_id).alias("_establishment"),
            F.lit(self.batch_id).alias("_batch_id"),
            F.lit(self.source_file).alias("_source_file"),
            line.cast("long").alias("_source_line"),
            (resource_id if resource_id is not None else F.lit(None)).cast("string").alias("_resource_id"),
            F.lit(self.extracted_at).cast("timestamp").alias("_extracted_at"),
            F.lit(self.ingested_at).cast("timestamp").alias("_ingested_at"),
        ]


@dataclass(frozen=True)
class ReadResult:
    """A parsed file: bronze rows, ingest-stage quarantine rows (per dataset)."""

    bronze: dict[str, DataFrame]
    quarantine: DataFrame


def read_header(path: Path, profile: CsvProfile) -> list[str]:
    """The header's field names, decoded with the declared charset."""
    with path.open("rb") as handle:
        first = handle.readline().rstrip(b"\r\n")
    try:
        text = first.decode(_PY_CHARSETS[profile.encoding])
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{path.name}: line 1: header is not valid {profile.encoding}: {exc.reason}") from None
    return [h.strip().strip(profile.quote).strip() for h in text.split(profile.delimiter)]


def _field_count(text: Column, profile: CsvProfile) -> tuple[Column, Column]:
    """Number of fields of a line, and whether its quotes are balanced."""
    q, d = profile.quote, profile.delimiter
    unquoted = F.regexp_replace(text, f"{_re(q)}([^{_re(q)}]|{_re(q)}{_re(q)})*{_re(q)}", "")
    balanced = ~unquoted.contains(q)
    count = F.size(F.split(unquoted, _re(d), -1))
    return count, balanced


def _re(ch: str) -> str:
    return "\\" + ch if not ch.isalnum() else ch


def _mapped(column: Column, mapping: dict[str, str]) -> Column:
    if not mapping:
        return column
    lookup = F.create_map(*[F.lit(x) for pair in mapping.items() for x in pair])
    return F.coalesce(lookup[column], column)


def read_csv_file(spark: SparkSession, path: Path, dataset: str, profile: CsvProfile,
                  lineage: FileLineage) -> ReadResult:
    """Read one CSV extract of ``dataset``: every data line ends in bronze or in quarantine.

    Raises :class:`HeaderError` when the header lacks the mapping's record-action
    column or maps nothing; a header problem concerns the whole file.
    """
    mapping = profile.columns[dataset]
    header = read_header(path, profile)
    positions = {canonical: header.index(source) for source, canonical in mapping.items() if source in header}
    if "record_action" not in positions:
        missing = [s for s, c in mapping.items() if c == "record_action"]
        raise HeaderError(f"{lineage.source_file}: line 1: no {missing[0] if missing else 'action'} column "
                          f"(maps to record_action); header is {profile.delimiter.join(header)}")

    text, valid = decode_strict("raw", profile.encoding)
    lines = (
        read_lines(spark, str(path))
        .where(F.col("line_no") > 1)
        .select("line_no", text.alias("text"), valid.alias("valid"))
        .where(~F.col("valid") | (F.trim(F.col("text")) != ""))
    )
    n_fields, balanced = _field_count(F.col("text"), profile)
    raw_schema = ", ".join(f"c{i} string" for i in range(len(header)))
    options = {"sep": profile.delimiter, "quote": profile.quote, "escape": profile.quote,
               "ignoreLeadingWhiteSpace": "true", "ignoreTrailingWhiteSpace": "true"}
    parsed = F.from_csv(F.col("text"), raw_schema, options)
    action_map = F.create_map(*[F.lit(x) for pair in profile.action_values.items() for x in pair])

    def field(canonical: str) -> Column:
        if canonical not in positions:
            return F.lit(None).cast("string")
        value = F.nullif(F.trim(F.col("_p").getField(f"c{positions[canonical]}")), F.lit(""))
        if canonical == "record_action":
            return action_map[value]
        return _mapped(value, profile.value_maps.get(canonical, {}))

    rule = (
        F.when(~F.col("valid"), F.lit(RULE_ENCODING))
        .when(~balanced, F.lit(RULE_MALFORMED))
        .when(n_fields != len(header), F.lit(RULE_MALFORMED))
    )
    reason = (
        F.when(~F.col("valid"), F.lit(f"bytes invalid in the declared encoding {profile.encoding}"))
        .when(~balanced, F.lit(f"unbalanced {profile.quote} quote"))
        .otherwise(F.format_string(f"%d fields, the header has {len(header)}", n_fields))
    )
    checked = lines.select("line_no", "text", rule.alias("_rule"), reason.alias("_reason"), n_fields.alias("_n"))
    checked = checked.withColumn("_p", F.when(F.col("_rule").isNull(), parsed))
    raw_action = (F.nullif(F.trim(F.col("_p").getField(f"c{positions['record_action']}")), F.lit(""))
                  if "record_action" in positions else F.lit(None))
    checked = checked.withColumn(
        "_rule", F.when(F.col("_rule").isNull() & field("record_action").isNull(), F.lit(RULE_ACTION))
        .otherwise(F.col("_rule")))
    checked = checked.withColumn(
        "_reason", F.when(F.col("_rule") == RULE_ACTION,
                          F.concat(F.lit("action value not in the profile's action_values: "),
                                   F.coalesce(F.substring(raw_action, 1, 3), F.lit("(empty)"))))
        .otherwise(F.col("_reason")))

    bronze = checked.where(F.col("_rule").isNull()).select(
        *[field(c).alias(c) for c in BRONZE_COLUMNS[dataset]],
        *lineage.columns(F.col("line_no")),
    )
    # Quarantined lines keep only their shape: their text cannot be pseudonymised.
    quarantine = checked.where(F.col("_rule").isNotNull()).select(
        F.lit(lineage.establishment_id).alias("establishment_id"),
        F.lit(lineage.batch_id).alias("batch_id"),
        F.lit(dataset).alias("dataset"),
        F.lit(STAGE_INGEST).alias("stage"),
        F.col("_rule").alias("rule"),
        F.concat(F.lit(f"{lineage.source_file} line "), F.col("line_no").cast("string"), F.lit(": "),
                 F.col("_reason")).alias("reason"),
        F.lit(lineage.source_file).alias("source_file"),
        F.col("line_no").alias("source_line"),
        F.lit(None).cast("string").alias("resource_id_hash"),
        F.lit(None).cast("string").alias("person_id"),
        F.to_json(F.struct(F.col("_n").alias("fields"), F.length("text").alias("characters"))).alias("record_safe"),
        F.current_timestamp().alias("quarantined_at"),
    )
    return ReadResult(bronze={dataset: bronze.select(*bronze_schema(dataset).fieldNames())}, quarantine=quarantine)


def header_problems(header: list[str], mapping: dict[str, str]) -> list[str]:
    """Headers the profile expects but the file lacks, for the batch log."""
    return [source for source in mapping if source not in header]


__all__ = ["FileLineage", "ReadResult", "HeaderError", "read_csv_file", "read_header", "header_problems"]
