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


_MIB = 1024 * 1024
_UNSPLITTABLE = (".gz", ".bz2", ".zst", ".snappy", ".lz4", ".deflate", ".xz")


def in_one_partition(spark: SparkSession, path: str) -> bool:
    """Whether Spark's text source reads the file in one partition (planning only, no job).

    A classic session asks the planned scan. A Spark Connect client has no RDD to
    ask, so it applies the rule Spark's file scan applies to one file (it is
    split in pieces of ``min(maxPartitionBytes, max(openCost, (size + openCost) /
    parallelism))`` bytes) to the file's size; a wrong answer cannot misnumber
    lines, :func:`read_lines` then fails instead.
    """
    from jobs.core.session import is_connect

    if not is_connect(spark):
        return spark.read.format("text").load(path).rdd.getNumPartitions() == 1
    return fits_one_split(spark, path)


def fits_one_split(spark: SparkSession, path: str) -> bool:
    """:func:`in_one_partition` from the file's size and the session's settings (no RDD needed)."""
    if path.lower().endswith(_UNSPLITTABLE):
        return True
    from jobs.core import files

    fs, name = files.filesystem(path)
    size = fs.get_file_info(name).size or 0
    conf = spark.conf
    max_bytes = _bytes(conf.get("spark.sql.files.maxPartitionBytes", "128m"))
    open_cost = _bytes(conf.get("spark.sql.files.openCostInBytes", "4m"))
    parallelism = int(conf.get("spark.sql.files.minPartitionNum", None)
                      or conf.get("spark.sql.leafNodeDefaultParallelism", None)
                      or conf.get("spark.default.parallelism", "1") or "1")
    split = min(max_bytes, max(open_cost, (size + open_cost) // max(parallelism, 1)))
    return size <= split


def _bytes(value: str | None) -> int:
    """A Spark size setting (``134217728``, ``128m``, ``4MB``) in bytes."""
    text = str(value).strip().lower().removesuffix("b")
    units = {"k": 1024, "m": _MIB, "g": 1024 * _MIB}
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def read_lines(spark: SparkSession, path: str, one_partition: bool | None = None) -> DataFrame:
    """Lines of one file as ``(line_no, raw)``: 1-based number, bytes as delivered.

    ``raw`` is binary: Spark's text source keeps the file's bytes unchanged
    (the cast to binary does not decode), so charset checks see what the
    establishment sent. A trailing ``\\r`` of a CRLF file is removed.

    A file Spark reads in one partition (any file smaller than a split) is
    numbered by its position in that partition, with no aggregate; should
    the scan be split after all when it runs, the read fails rather than
    misnumber a line. ``one_partition`` is :func:`in_one_partition`'s answer when
    the caller already asked it (so that it decides once per file).
    """
    text = spark.read.format("text").load(path)
    without_cr = (F.when(F.expr("right(raw, 1) = X'0D'"), F.expr("substring(raw, 1, length(raw) - 1)"))
                  .otherwise(F.col("raw")).alias("raw"))
    if in_one_partition(spark, path) if one_partition is None else one_partition:
        position = F.when(F.spark_partition_id() == 0, F.monotonically_increasing_id() + 1).otherwise(
            # No file name in the message: a delivered name may hold identifiers (and plans print literals).
            F.raise_error(F.lit("a file planned as one partition was read as several; read it again")))
        return (text.select(position.cast("long").alias("line_no"), F.col("value").cast("binary").alias("raw"))
                .select("line_no", without_cr))
    # Not cached: a file scan's partitions are the same in both branches (the offsets and the
    # numbered lines), and each reader caches what it parsed from the lines, released after its
    # writes. A cache here would outlive the read (nothing could release it).
    tagged = text.select(
        F.col("value").cast("binary").alias("raw"),
        F.spark_partition_id().alias("_pid"),
        F.monotonically_increasing_id().alias("_mid"),
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
    return tagged.join(F.broadcast(offsets), on="_pid", how="inner").select(
        (F.col("_offset") + F.expr(f"_mid & {_INDEX_BITS}") + F.lit(1)).cast("long").alias("line_no"),
        without_cr,
    )


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


def utf8_in_single_byte(raw: str | F.Column, encoding: str) -> F.Column:
    """True where a line declared in a single-byte charset is in fact UTF-8.

    Latin-1 and cp1252 accept every byte, so UTF-8 read with them decodes
    "successfully" into mojibake (``UnitÃ© de soins``). A line whose bytes
    hold non-ASCII characters and are, as a whole, valid UTF-8 was written in
    UTF-8: accented Latin-1 text is practically never valid UTF-8 (``é`` is
    ``E9``, a lead byte that needs continuation bytes after it). For a UTF-8
    profile this is always false.
    """
    raw_col = F.col(raw) if isinstance(raw, str) else raw
    if ENCODING_ALIASES[encoding.lower()] == "UTF-8":
        return F.lit(False)
    as_utf8 = raw_col.cast("string")
    return F.is_valid_utf8(as_utf8) & (F.length(raw_col) > F.length(as_utf8))


# Lines are numbered in buckets of this many for the running quote state: each bucket is one
# window partition, and one small aggregate per bucket carries the state across buckets.
_BUCKET_LINES = 1 << 16


def quote_count(text: F.Column, quote: str) -> F.Column:
    """How many ``quote`` characters a line holds: a length difference, no regular expression."""
    return F.length(text) - F.length(F.replace(text, F.lit(quote), F.lit("")))


def join_quoted_lines(lines: DataFrame, small: bool = False) -> DataFrame:
    """Physical lines → logical records: a line that starts inside an open quote continues a record.

    ``lines`` has ``line_no``, ``text`` (null where undecodable), ``valid``,
    ``mismatch`` and ``odd`` (the line holds an odd number of quote characters,
    so it opens or closes a quoted field). The result has one row per record:
    ``line_no`` (its first line), ``last_line``, ``text`` (its lines joined with
    ``\\n``, null if one of them is undecodable), ``valid``, ``mismatch``.

    The quote state is a running count of odd lines, computed per bucket of
    lines plus one small aggregate per bucket, so no window sees the whole file
    and nothing is matched with a regular expression (a quoted field of any
    length costs a linear scan). A quote never closed runs to the end of the
    file: that record is unbalanced and its shape says so.

    ``small`` (a file read in one partition) runs the count in one window over
    all its lines instead: the same result, without the per-bucket aggregate.
    """
    odd_line = F.when(F.col("odd"), F.col("line_no"))
    if small:
        preceding = Window.orderBy("line_no").rowsBetween(Window.unboundedPreceding, -1)
        state = lines.select(
            "line_no", "text", "valid", "mismatch", "odd",
            F.coalesce(F.sum(F.col("odd").cast("long")).over(preceding), F.lit(0)).alias("_odd_before"),
            F.max(odd_line).over(preceding).alias("_opener"),
        )
    else:
        tagged = lines.withColumn("_bucket", F.floor((F.col("line_no") - 1) / F.lit(_BUCKET_LINES)))
        before = Window.orderBy("_bucket").rowsBetween(Window.unboundedPreceding, -1)
        carried = (
            tagged.groupBy("_bucket")
            .agg(F.sum(F.col("odd").cast("long")).alias("_odd"), F.max(odd_line).alias("_last_odd"))
            .select("_bucket",
                    F.coalesce(F.sum("_odd").over(before), F.lit(0)).alias("_odd_carried"),
                    F.max("_last_odd").over(before).alias("_opener_carried"))
        )
        preceding = Window.partitionBy("_bucket").orderBy("line_no").rowsBetween(Window.unboundedPreceding, -1)
        state = tagged.join(F.broadcast(carried), on="_bucket", how="inner").select(
            "line_no", "text", "valid", "mismatch", "odd",
            (F.coalesce(F.sum(F.col("odd").cast("long")).over(preceding), F.lit(0)) + F.col("_odd_carried"))
            .alias("_odd_before"),
            F.coalesce(F.max(odd_line).over(preceding), F.col("_opener_carried")).alias("_opener"),
        )
    continued = F.col("_odd_before") % 2 == 1
    single = state.where(~continued & ~F.col("odd")).select(
        "line_no", F.col("line_no").alias("last_line"), "text", "valid", "mismatch")
    parts = F.sort_array(F.collect_list(F.struct("line_no", "text", "valid")))
    multi = (
        state.where(continued | F.col("odd"))
        .groupBy(F.when(continued, F.col("_opener")).otherwise(F.col("line_no")).alias("line_no"))
        .agg(parts.alias("_parts"), F.bool_and("valid").alias("valid"), F.bool_or("mismatch").alias("mismatch"),
             F.max("line_no").alias("last_line"))
        .select("line_no", "last_line",
                F.when(F.col("valid"), F.array_join(F.transform("_parts", lambda p: p["text"]), "\n")).alias("text"),
                "valid", "mismatch")
    )
    return single.unionByName(multi)
