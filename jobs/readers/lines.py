"""Physical lines of a landed file, with their exact line numbers and raw bytes.

Spark's CSV and JSON readers hide what matters for accountability (which line,
which bytes), so files are read as lines first. Line numbers come from the
partition layout, not from a global sort: ``monotonically_increasing_id`` is
``partition << 33 | index``, and one small aggregate gives each partition's
offset, so numbering stays a narrow operation at any size.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

_INDEX_BITS = (1 << 33) - 1


def read_lines(spark: SparkSession, path: str) -> DataFrame:
    """Lines of one file as ``(line_no, raw)``: 1-based number, bytes as delivered.

    ``raw`` is binary: Spark's text source keeps the file's bytes unchanged
    (the cast to binary does not decode), so charset checks see what the
    establishment sent. A trailing ``\\r`` of a CRLF file is removed.
    """
    text = spark.read.format("text").load(path)
    tagged = (
        text.select(
            F.col("value").cast("binary").alias("raw"),
            F.spark_partition_id().alias("_pid"),
            F.monotonically_increasing_id().alias("_mid"),
        )
        .cache()
    )
    offsets = (
        tagged.groupBy("_pid").agg(F.count(F.lit(1)).alias("_n"))
        .select(
            "_pid",
            (F.sum("_n").over(Window.orderBy("_pid").rowsBetween(Window.unboundedPreceding, -1)))
            .alias("_offset"),
        )
        .fillna(0, subset=["_offset"])
    )
    numbered = tagged.join(F.broadcast(offsets), on="_pid", how="inner").select(
        (F.col("_offset") + F.expr(f"_mid & {_INDEX_BITS}") + F.lit(1)).cast("long").alias("line_no"),
        F.when(F.expr("right(raw, 1) = X'0D'"), F.expr("substring(raw, 1, length(raw) - 1)"))
        .otherwise(F.col("raw")).alias("raw"),
    )
    return numbered


# Control characters that never belong in a text extract (C0 except tab, C1 block).
CONTROL_CHARS = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]"

ENCODING_ALIASES = {
    "utf-8": "UTF-8",
    "utf-8-sig": "UTF-8",
    "latin-1": "ISO-8859-1",
    "iso-8859-1": "ISO-8859-1",
    "cp1252": "windows-1252",
    "windows-1252": "windows-1252",
}


def decode_strict(raw: str | F.Column, encoding: str) -> tuple[F.Column, F.Column]:
    """Decode bytes with the declared charset; return ``(text, is_valid)``.

    UTF-8 is checked byte by byte (``is_valid_utf8``); single-byte charsets
    accept every byte, so for them a control character (what a wrongly
    declared or corrupted file produces) is what makes a line invalid. A
    byte-order mark is removed where the profile declares ``utf-8-sig``.
    """
    raw_col = F.col(raw) if isinstance(raw, str) else raw
    charset = ENCODING_ALIASES[encoding.lower()]
    if charset == "UTF-8":
        as_string = raw_col.cast("string")
        valid = F.is_valid_utf8(as_string)
        text = F.when(valid, as_string)
        if encoding.lower() == "utf-8-sig":
            text = F.regexp_replace(text, "^\uFEFF", "")
    else:
        text = F.decode(raw_col, charset)
        valid = F.lit(True)
    valid = valid & ~F.coalesce(text, F.lit("")).rlike(CONTROL_CHARS)
    return text, valid
