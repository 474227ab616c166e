"""CSV extracts → bronze rows and quarantine rows, driven by the establishment's profile.

Spark's CSV reader in PERMISSIVE mode pads short rows, cuts long ones and can
drop corrupt ones silently, so lines are read first (:mod:`jobs.readers.lines`),
decoded strictly with the declared charset, joined into records where a quoted
field spans lines, and their fields counted here with linear scans (no regular
expression over a quoted field). Only well-formed records are parsed, with
``from_csv`` on each record's text. A record is quarantined with its file and
first line when its bytes are invalid in the declared charset, when they are
UTF-8 in a single-byte profile (``ingest.encoding_mismatch``), when its quotes
or field count are wrong, or when a field is longer than ``max_field_bytes``.

A ``lab_result`` file of a profile that also maps ``observation`` is routed row
by row (:func:`routed_to_observation`): a row whose code or category the
profile's ``observations`` lists, or whose value is one of its declared answers,
is read with the ``observation`` mapping, any other stays a lab result; each
record lands in one of the two. An observation keeps a number or a declared
answer; any other text is dropped and counted (:meth:`ReadResult.free_text_dropped`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from jobs.core.batchlog import Stage
from jobs.core.config import CsvProfile, ObservationRouting
from jobs.readers.lines import (decode_strict, in_one_partition, join_quoted_lines, quote_count, read_lines,
                                utf8_in_single_byte)
from jobs.core.schemas import BRONZE_COLUMNS, PERSON_IDENTIFIERS, QUARANTINE_SCHEMA, RECORD_REF, bronze_schema

STAGE_INGEST = Stage.INGEST.value
RULE_ENCODING = "ingest.encoding"
RULE_MALFORMED = "ingest.malformed_line"
RULE_ACTION = "ingest.unknown_action"
RULE_ENCODING_MISMATCH = "ingest.encoding_mismatch"
RULE_FIELD_TOO_LONG = "ingest.field_too_long"
LAB_RESULT = "lab_result"
OBSERVATION = "observation"
# A number as an observation's value (a score, a count) is kept; any other text must be a declared answer.
_NUMBER_POINT = r"^[-+]?[0-9]+(\.[0-9]+)?$"
_NUMBER_COMMA = r"^[-+]?[0-9]+(,[0-9]+)?$"
# Joins the source values a derived record id is built from (``derived_ids``): a unit separator,
# which no clinical value holds.
DERIVED_ID_SEPARATOR = "\u001f"
# Used when no configuration is at hand; config/pipeline.yaml declares the consortium's value.
DEFAULT_MAX_FIELD_BYTES = 1 << 20
# Records longer than this are never parsed, whatever the field limit: the CSV parser fails on
# values of about 32 M characters and the failure kills the executor (the driver, in local mode).
RECORD_HARD_LIMIT_BYTES = 16 << 20

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
    # What the batch log should say about the file (a byte-order mark removed…).
    notes: tuple[str, ...] = ()
    # The checked records bronze and quarantine are both taken from, cached once parsed.
    cached: DataFrame | None = None
    # Lines of observations whose word answer is not in the profile's closed list: landed without it.
    free_text: DataFrame | None = None
    # False when the file was found to hold no record before Spark read it (its frames are empty).
    holds_records: bool = True

    def free_text_dropped(self) -> int:
        """Answers dropped as possible free text from rows that landed (runs one small Spark job)."""
        return self.free_text.count() if self.free_text is not None else 0

    def unpersist(self) -> None:
        """Unpersist the checked records; call once bronze and quarantine are written. They are a local
        checkpoint: its rows go with the last frame that refers to it (:mod:`jobs.core.checkpoints`)."""
        if self.cached is not None:
            self.cached.unpersist()


BOM_UTF8 = b"\xef\xbb\xbf"
_OTHER_BOMS = {b"\xff\xfe": "UTF-16 LE", b"\xfe\xff": "UTF-16 BE"}


def _first_line(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.readline().rstrip(b"\r\n")


def byte_order_mark(path: Path, profile: CsvProfile, reference: str) -> str | None:
    """What to say about a byte-order mark at the start of the file (``None`` when there is none to mention).

    Messages name the file by its ``reference`` (``<batch>#<index>``): a
    delivered file's name may hold identifiers and stays in landing.

    A BOM must never silently become part of the first header (``\ufeffmrn``
    maps to nothing and every row loses its key). In a UTF-8 profile it is
    removed; a ``utf-8`` profile (not ``utf-8-sig``) gets a note for the batch
    log. In a single-byte profile it proves the file is not in the declared
    charset: :class:`HeaderError`.
    """
    first = _first_line(path)
    for mark, name in _OTHER_BOMS.items():
        if first.startswith(mark):
            raise HeaderError(f"{reference}: line 1: the file starts with a {name} byte-order mark; "
                              f"the profile declares {profile.encoding}. Ask for the export in "
                              f"{profile.encoding} or declare the establishment's real encoding.")
    if not first.startswith(BOM_UTF8):
        return None
    if _PY_CHARSETS[profile.encoding] not in ("utf-8", "utf-8-sig"):
        raise HeaderError(f"{reference}: line 1: the file starts with a UTF-8 byte-order mark (EF BB BF) "
                          f"but the profile declares {profile.encoding}: the file is UTF-8. Fix the "
                          "profile's encoding (utf-8-sig) or the establishment's export.")
    if profile.encoding == "utf-8-sig":
        return None
    return (f"{reference}: UTF-8 byte-order mark (EF BB BF) removed before the first header; "
            "the profile declares utf-8, declare utf-8-sig if the establishment always sends one")


def read_header(path: Path, profile: CsvProfile, reference: str) -> list[str]:
    """The header's field names, decoded with the declared charset (a UTF-8 byte-order mark removed).

    Errors name the file by its ``reference`` (``<batch>#<index>``), never by its delivered name.
    """
    first = _first_line(path)
    if byte_order_mark(path, profile, reference) is not None or profile.encoding == "utf-8-sig":
        first = first.removeprefix(BOM_UTF8)
    try:
        text = first.decode(_PY_CHARSETS[profile.encoding])
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{reference}: line 1: header is not valid {profile.encoding}: {exc.reason}") from None
    return [h.strip().strip(profile.quote).strip() for h in text.split(profile.delimiter)]


def header_drift(header: list[str], expected: list[str]) -> str:
    """How a file's source headers differ from those the profile expects ('' when they do not).

    Compared with the profile (:meth:`CsvProfile.expected_headers`: mapped,
    id-building, identifier and ignored columns), not with the staged columns:
    a renamed source column (``unite`` → ``ward``) keeps every staged column
    and would land as NULL.
    """
    missing = [h for h in expected if h not in header]
    unexpected = [h for h in header if h not in expected]
    parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {unexpected}"] if unexpected else [])
    return ", ".join(parts)


def _field_count(text: Column, profile: CsvProfile) -> tuple[Column, Column]:
    """Number of fields of a record, and whether its quotes are balanced.

    Split at the quote character: the even pieces lie outside quoted fields
    (a doubled quote leaves an empty odd piece between), so the fields are one
    more than the delimiters in the even pieces. Every step is a linear scan;
    no regular expression walks a quoted field (one that does overflows the
    JVM stack on a clinical note of a few kilobytes).
    """
    pieces = F.split(text, _re(profile.quote), -1)
    balanced = F.size(pieces) % 2 == 1
    outside = F.filter(pieces, lambda piece, i: i % 2 == 0)
    delimiters = F.aggregate(outside, F.lit(0), lambda acc, piece: acc + quote_count(piece, profile.delimiter))
    return delimiters + 1, balanced


def _quotes_misplaced(text: Column, profile: CsvProfile) -> Column:
    """True where a quoted field has characters after its closing quote (``"Tremblay"x``) or before
    its opening one: the record is not CSV, whatever a lenient parser would make of it.

    The even pieces lie outside quoted fields: each but the first follows a
    closing quote, each but the last precedes an opening one. The lambdas see
    only their piece and its index: an expression over the whole record inside
    one (the number of pieces) is evaluated again for every piece, which makes
    a note with thousands of quotes cost quadratic time.
    """
    pieces = F.split(text, _re(profile.quote), -1)
    d = profile.delimiter

    def after_close(piece: Column, i: Column) -> Column:
        return (i > 0) & (i % 2 == 0) & (F.ltrim(piece) != "") & ~F.ltrim(piece).startswith(d)

    def before_open(piece: Column, i: Column) -> Column:
        return (i % 2 == 0) & (F.rtrim(piece) != "") & ~F.rtrim(piece).endswith(d)

    all_but_last = F.slice(pieces, 1, F.size(pieces) - 1)
    return (F.exists(F.transform(pieces, after_close), lambda bad: bad)
            | F.exists(F.transform(all_but_last, before_open), lambda bad: bad))


def _longest_field(text: Column, profile: CsvProfile) -> Column:
    """``(bytes, field)``: the size in UTF-8 bytes of a record's longest field and its 0-based position.

    Measured without parsing, in one linear pass: pieces between quotes are
    inside a quoted field when odd, and the delimiters of the even pieces
    start new fields. A record too long for a field limit is never handed to
    the CSV parser, which fails (and takes the executor with it) on values of
    tens of megabytes.
    """
    def token(separated: Column, piece: Column) -> Column:
        return F.struct(separated.alias("sep"), F.octet_length(piece).cast("long").alias("len"))

    tokens = F.flatten(F.transform(
        F.split(text, _re(profile.quote), -1),
        lambda piece, i: F.when(i % 2 == 1, F.array(token(F.lit(False), piece))).otherwise(
            F.transform(F.split(piece, _re(profile.delimiter), -1), lambda part, j: token(j > 0, part)))))
    start = F.struct(F.lit(0).cast("long").alias("cur"), F.lit(0).alias("idx"),
                     F.lit(-1).cast("long").alias("mx"), F.lit(0).alias("at"))

    def step(acc: Column, t: Column) -> Column:
        closes_longer = acc["cur"] > acc["mx"]
        return F.when(t["sep"], F.struct(
            t["len"].alias("cur"), (acc["idx"] + 1).alias("idx"),
            F.when(closes_longer, acc["cur"]).otherwise(acc["mx"]).alias("mx"),
            F.when(closes_longer, acc["idx"]).otherwise(acc["at"]).alias("at"),
        )).otherwise(F.struct((acc["cur"] + t["len"]).alias("cur"), acc["idx"].alias("idx"),
                              acc["mx"].alias("mx"), acc["at"].alias("at")))

    def finish(acc: Column) -> Column:
        last = acc["cur"] > acc["mx"]
        return F.struct(F.when(last, acc["cur"]).otherwise(acc["mx"]).alias("bytes"),
                        F.when(last, acc["idx"]).otherwise(acc["at"]).alias("field"))

    return F.aggregate(tokens, start, step, finish)


def identifiers_json(values: dict[str, Column]) -> Column:
    """The bronze ``person_identifiers`` column: ``{system: value}`` of the values present, as JSON; null when none is."""
    if not values:
        return F.lit(None).cast("string")
    present = F.map_filter(F.map_from_arrays(F.array(*[F.lit(s) for s in values]), F.array(*values.values())),
                           lambda k, v: v.isNotNull())
    return F.when(F.size(present) > 0, F.to_json(present))


def _re(ch: str) -> str:
    return "\\" + ch if not ch.isalnum() else ch


def _mapped(column: Column, mapping: dict[str, str]) -> Column:
    if not mapping:
        return column
    lookup = F.create_map(*[F.lit(x) for pair in mapping.items() for x in pair])
    return F.coalesce(lookup[column], column)


def read_records(spark: SparkSession, path: Path, profile: CsvProfile) -> DataFrame:
    """Data records of one extract: ``line_no`` (first line), ``last_line``, ``text``, ``valid``, ``mismatch``.

    A quoted field may hold delimiters and line breaks; blank lines between
    records are not records.
    """
    text, valid = decode_strict("raw", profile.encoding)
    small = in_one_partition(spark, str(path))
    lines = read_lines(spark, str(path), one_partition=small).select(
        "line_no", text.alias("text"), valid.alias("valid"),
        utf8_in_single_byte("raw", profile.encoding).alias("mismatch"),
        # Counted on the raw bytes so an undecodable line still opens or closes its quote.
        (quote_count(F.col("raw").cast("string"), profile.quote) % 2 == 1).alias("odd"),
    )
    return (join_quoted_lines(lines, small=small)
            .where(F.col("line_no") > 1)
            .where(~F.col("valid") | (F.trim(F.col("text")) != "")))


# Files up to this size are looked at from Python for a record before Spark reads them.
NO_RECORD_PROBE_BYTES = 64 * 1024


def holds_no_record(path: Path, profile: CsvProfile) -> bool:
    """Whether the file is its header line followed only by blank lines (spaces and line breaks), so that
    :func:`read_records` would find no record in it; decided from its bytes (every supported encoding
    writes those bytes as ASCII does). A file over :data:`NO_RECORD_PROBE_BYTES`, or whose first line holds
    a quote (a quoted header field may span lines), is left to Spark: False."""
    if path.stat().st_size > NO_RECORD_PROBE_BYTES:
        return False
    data = path.read_bytes()
    ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
    first_end = min(ends) if ends else len(data)
    if profile.quote.encode("ascii", "replace") in data[:first_end]:
        return False
    return data[first_end:].strip(b" \r\n") == b""


def read_csv_file(spark: SparkSession, path: Path, dataset: str, profile: CsvProfile,
                  lineage: FileLineage, max_field_bytes: int = DEFAULT_MAX_FIELD_BYTES) -> ReadResult:
    """Read one CSV extract of ``dataset``: every data record ends in bronze or in quarantine.

    ``max_field_bytes`` is the consortium's limit (``config/pipeline.yaml``);
    the profile's own ``max_field_bytes`` overrides it. Raises
    :class:`HeaderError` when the header lacks the mapping's record-action
    column, or starts with a byte-order mark the profile's charset cannot
    hold; a header problem concerns the whole file.
    """
    mapping = profile.columns[dataset]
    notes = tuple(n for n in [byte_order_mark(path, profile, lineage.source_file)] if n)
    header = read_header(path, profile, lineage.source_file)
    limit = profile.max_field_bytes or max_field_bytes
    positions = {canonical: header.index(source) for source, canonical in mapping.items() if source in header}
    if "record_action" not in positions and not profile.default_action:
        missing = [s for s, c in mapping.items() if c == "record_action"]
        raise HeaderError(f"{lineage.source_file}: line 1: no {missing[0] if missing else 'action'} column "
                          f"(maps to record_action); header is {profile.delimiter.join(header)}")
    # A lab_result file's rows are routed between lab_result and observation when both are mapped.
    targets = [dataset, OBSERVATION] if dataset == LAB_RESULT and profile.routes_observations() else [dataset]
    for target in targets:
        absent = [h for h in profile.derived_ids.get(target, []) if h not in header]
        if absent:
            raise HeaderError(f"{lineage.source_file}: line 1: no {absent} column(s), which derived_ids.{target} "
                              f"builds the record id from; header is {profile.delimiter.join(header)}")
    identifiers = ({system: header.index(source) for system, source in profile.person_identifiers.items()
                    if source in header} if dataset == "patient" else {})
    if holds_no_record(path, profile):
        # An empty extract (an incremental delivery's file of a dataset with no change): its header checked
        # above, no Spark job reads it.
        return ReadResult(bronze={t: spark.createDataFrame([], bronze_schema(t)) for t in targets},
                          quarantine=spark.createDataFrame([], QUARANTINE_SCHEMA), notes=notes, holds_records=False)

    records = read_records(spark, path, profile)
    n_fields, balanced = _field_count(F.col("text"), profile)
    misplaced = _quotes_misplaced(F.col("text"), profile)
    raw_schema = ", ".join(f"c{i} string" for i in range(len(header)))
    options = {"sep": profile.delimiter, "quote": profile.quote, "escape": profile.quote,
               "ignoreLeadingWhiteSpace": "true", "ignoreTrailingWhiteSpace": "true"}
    parsed = F.from_csv(F.col("text"), raw_schema, options)
    action_map = F.create_map(*[F.lit(x) for pair in profile.action_values.items() for x in pair])

    def source(index: int) -> Column:
        return F.nullif(F.trim(F.col("_p").getField(f"c{index}")), F.lit(""))

    def field(canonical: str, target: str = dataset) -> Column:
        """A canonical column of ``target`` read from the record with the profile's mapping of ``target``."""
        constants = profile.constants.get(target, {})
        derived_from = profile.derived_ids.get(target, [])
        at = positions if target == dataset else {
            c: header.index(h) for h, c in profile.columns[target].items() if h in header}
        if canonical in constants:
            return F.lit(constants[canonical])
        if canonical == RECORD_REF[target] and derived_from:
            # Empty parts stay in place ("a||c" differs from "a|c|"); all empty is no id at all.
            parts = [F.coalesce(source(header.index(h)), F.lit("")) for h in derived_from]
            return F.nullif(F.concat_ws(DERIVED_ID_SEPARATOR, *parts),
                            F.lit(DERIVED_ID_SEPARATOR * (len(parts) - 1)))
        if canonical == "record_action" and target != dataset:
            return field("record_action")  # a routed row takes its file's action
        if canonical == "record_action" and "record_action" not in positions:
            return F.lit(profile.default_action)
        if canonical == PERSON_IDENTIFIERS:
            return identifiers_json({system: source(i) for system, i in identifiers.items()})
        if canonical not in at:
            return F.lit(None).cast("string")
        value = source(at[canonical])
        if canonical == "record_action":
            return action_map[value]
        return _mapped(value, profile.value_maps.get(canonical, {}))

    spans = F.col("last_line") > F.col("line_no")
    lines_text = F.when(spans, F.format_string(" (record of lines %d-%d)", F.col("line_no"), F.col("last_line"))) \
        .otherwise(F.lit(""))
    rule = (
        F.when(F.col("mismatch"), F.lit(RULE_ENCODING_MISMATCH))
        .when(~F.col("valid"), F.lit(RULE_ENCODING))
        .when(~balanced, F.lit(RULE_MALFORMED))
        .when(misplaced, F.lit(RULE_MALFORMED))
        .when(n_fields != len(header), F.lit(RULE_MALFORMED))
    )
    reason = (
        F.when(F.col("mismatch"), F.lit(f"bytes are UTF-8 but the profile declares {profile.encoding}"))
        .when(~F.col("valid"), F.lit(f"bytes invalid in the declared encoding {profile.encoding}"))
        .when(~balanced, F.concat(F.lit(f"unbalanced {profile.quote} quote"), lines_text,
                                  F.when(spans, F.lit(": the quote is never closed")).otherwise(F.lit(""))))
        .when(misplaced, F.concat(F.lit(f"characters after a closing {profile.quote} quote or before an "
                                        "opening one"), lines_text))
        .otherwise(F.concat(F.format_string(f"%d fields, the header has {len(header)}", n_fields), lines_text))
    )
    longest = _longest_field(F.col("text"), profile)
    headers = F.array(*[F.lit(h) for h in header])
    size = F.octet_length("text")
    # Only a record longer than the field limit can hold a field over it: only those are measured.
    field_over = (size > limit) & (F.col("_longest.bytes") > limit)
    rule = (rule.when(field_over, F.lit(RULE_FIELD_TOO_LONG))
            .when(size > RECORD_HARD_LIMIT_BYTES, F.lit(RULE_FIELD_TOO_LONG)))
    reason = (F.when(F.col("mismatch") | ~F.col("valid") | ~balanced | misplaced | (n_fields != len(header)), reason)
              .when(field_over, F.format_string(f"field %s holds %d bytes, more than max_field_bytes {limit}",
                                                F.element_at(headers, F.col("_longest.field") + 1),
                                                F.col("_longest.bytes")))
              .otherwise(F.format_string(f"record of %d bytes, more than the {RECORD_HARD_LIMIT_BYTES} "
                                         "bytes a record may hold", size)))
    checked = (records
               .withColumn("_longest", F.when(F.col("valid") & (size > limit), longest))
               .select("line_no", "text", rule.alias("_rule"), reason.alias("_reason"),
                       F.when(F.col("valid"), n_fields).alias("_n")))
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
    # One parse feeds bronze and quarantine: without it kept, each write would read, number,
    # join and check the file's lines again. A local checkpoint rather than a cache: the queries
    # after it plan a one-node relation instead of analysing the parse and checks again.
    checked = checked.localCheckpoint(eager=False, storageLevel=StorageLevel.MEMORY_AND_DISK)

    accepted = checked.where(F.col("_rule").isNull())
    routing = profile.observations
    bronze: dict[str, DataFrame] = {}
    free_text: DataFrame | None = None
    if OBSERVATION in targets:
        to_observation = F.lit(True) if dataset == OBSERVATION else routed_to_observation(
            routing, field("observation_code", OBSERVATION), field("observation_system", OBSERVATION),
            field("category", OBSERVATION), field("value", OBSERVATION))
        kept, dropped = observation_value(field("value", OBSERVATION), routing, profile.decimal_separator)
        observations = accepted.where(to_observation)
        bronze[OBSERVATION] = observations.select(
            *[(kept if c == "value" else field(c, OBSERVATION)).alias(c) for c in BRONZE_COLUMNS[OBSERVATION]],
            *lineage.columns(F.col("line_no")))
        free_text = observations.where(dropped).select("line_no")
        accepted = accepted.where(~to_observation)
    if dataset != OBSERVATION:
        bronze[dataset] = accepted.select(*[field(c).alias(c) for c in BRONZE_COLUMNS[dataset]],
                                          *lineage.columns(F.col("line_no")))
    for target, frame in list(bronze.items()):
        if target in profile.derived_id_sequence:
            frame = number_within_ids(frame, target)
        bronze[target] = frame.select(*bronze_schema(target).fieldNames())
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
    return ReadResult(bronze=bronze, quarantine=quarantine, notes=notes, cached=checked, free_text=free_text)


def routed_to_observation(routing: ObservationRouting, code: Column, system: Column, category: Column,
                          value: Column) -> Column:
    """Whether a row of a lab_result file is an observation: its code (``code`` or ``system|code``) or
    its category is listed in the profile's ``observations``, or its value is one of the closed list's answers."""
    listed = F.lit(False)
    if routing.codes:
        listed = code.isin(routing.codes) | F.concat_ws("|", system, code).isin(routing.codes)
    in_category = F.lower(category).isin([c.lower() for c in routing.categories]) if routing.categories else F.lit(False)
    answers = list(routing.answer_lookup())
    is_answer = F.lower(F.trim(value)).isin(answers) if answers else F.lit(False)
    return F.coalesce(listed, F.lit(False)) | F.coalesce(in_category, F.lit(False)) | F.coalesce(is_answer, F.lit(False))


def observation_value(value: Column, routing: ObservationRouting, decimal_separator: str) -> tuple[Column, Column]:
    """``(kept, dropped)``: an observation's value as it may leave the reader, and whether text was dropped.

    A number is kept; a word answer only when it is one of the profile's closed list, written as
    the list writes it. Any other text may be free text (an address typed into a survey answer):
    it is dropped, and counted, while the row lands.
    """
    text = F.nullif(F.trim(value), F.lit(""))
    number = _NUMBER_COMMA if decimal_separator == "," else _NUMBER_POINT
    lookup = routing.answer_lookup()
    answer = (F.try_element_at(F.create_map(*[F.lit(x) for pair in lookup.items() for x in pair]), F.lower(text))
              if lookup else F.lit(None).cast("string"))
    kept = F.when(text.rlike(number), text).otherwise(answer)
    return kept, F.coalesce(text.isNotNull() & kept.isNull(), F.lit(False))


def number_within_ids(bronze: DataFrame, dataset: str) -> DataFrame:
    """Append a sequence number to each derived record id, within the rows of one file that share it.

    Rows sharing an id are numbered in the order of their content (every canonical column but the
    id), not of their lines: the same rows get the same ids in every delivery, whatever the order
    of the export. Identical rows get one number, so exact duplicates are still dropped as such.
    A row without an id keeps none.
    """
    ref = RECORD_REF[dataset]
    content = [c for c in BRONZE_COLUMNS[dataset] if c != ref]
    same_id = Window.partitionBy(ref).orderBy(*[F.col(c).asc_nulls_first() for c in content])
    numbered = F.concat_ws(DERIVED_ID_SEPARATOR, F.col(ref), F.dense_rank().over(same_id).cast("string"))
    return bronze.withColumn(ref, F.when(F.col(ref).isNotNull(), numbered))


__all__ = ["FileLineage", "ReadResult", "HeaderError", "read_csv_file", "read_header", "read_records",
           "header_drift", "byte_order_mark", "number_within_ids", "routed_to_observation", "observation_value"]
