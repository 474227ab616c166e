"""Write one dataset of one batch as the establishment's CSV dialect says.

Everything comes from the profile (``config/establishments/<id>.yaml``):
headers (the inverse of ``columns``), delimiter, quote, charset, date
patterns, decimal separator, action codes and value maps. No establishment is
named here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from jobs.core.config import CsvProfile
from jobs.generate import defects as D
from jobs.generate.formats import (
    format_decimals,
    format_doses,
    format_instants,
    impossible_date,
    spark_to_strftime,
)
from jobs.generate.timeline import CHANGE_DELETE, CHANGE_NEW, CHANGE_UPDATE
from jobs.core.schemas import ACTION_DELETE, ACTION_UPSERT, RECORD_REF

DATE_COLUMNS = frozenset({"birth_date", "deceased_date", "condition_date", "start_date", "end_date",
                          "decision_date", "valid_from", "valid_until"})
DATETIME_COLUMNS = frozenset({"visit_start", "visit_end", "measured_at"})
BOM = b"\xef\xbb\xbf"
LINE_END = "\n"


class ProfileCannotWrite(ValueError):
    """The profile has no source value for a value the generator must write."""


@dataclass(frozen=True)
class WrittenFile:
    data: bytes
    rows: int
    # (line number, defect kind, resource id) of each injected defect.
    defects: list[tuple[int, str, str | None]]


def action_codes(profile: CsvProfile) -> dict[str, str]:
    """Source action code per change: first upsert code for new records, the second (if any) for updates."""
    upserts = [code for code, action in profile.action_values.items() if action == ACTION_UPSERT]
    deletes = [code for code, action in profile.action_values.items() if action == ACTION_DELETE]
    if not upserts or not deletes:
        raise ProfileCannotWrite("action_values needs at least one upsert and one delete code")
    return {CHANGE_NEW: upserts[0], CHANGE_UPDATE: upserts[-1], CHANGE_DELETE: deletes[0]}


def _source_values(profile: CsvProfile, column: str, values: np.ndarray) -> np.ndarray:
    mapping = profile.value_maps.get(column)
    if not mapping:
        return values
    inverse: dict[str, str] = {}
    for source, canonical in mapping.items():
        inverse.setdefault(canonical, source)
    missing = sorted({v for v in values.tolist() if v and v not in inverse})
    if missing:
        raise ProfileCannotWrite(f"value_maps.{column} has no source value for {missing}")
    return np.array([inverse.get(v, v) for v in values.tolist()], dtype=object)


def _text(values: pd.Series) -> np.ndarray:
    return np.array(["" if (v is None or v != v) else str(v) for v in values.tolist()], dtype=object)


def format_rows(rows: pd.DataFrame, dataset: str, profile: CsvProfile) -> list[np.ndarray]:
    """Field text per source header, in header order."""
    date_format = spark_to_strftime(profile.date_format)
    datetime_format = spark_to_strftime(profile.datetime_format)
    actions = action_codes(profile)
    deleted = rows["_change"].to_numpy() == CHANGE_DELETE
    keep_on_delete = {RECORD_REF[dataset], "patient_ref", "record_action"}
    impossible = rows["_impossible"].to_numpy()
    columns = []
    for canonical in profile.columns[dataset].values():
        if canonical == "record_action":
            text = np.array([actions[c] for c in rows["_change"].tolist()], dtype=object)
        elif canonical in DATE_COLUMNS:
            text = format_instants(rows[canonical].to_numpy().astype("datetime64[D]"), date_format)
        elif canonical in DATETIME_COLUMNS:
            text = format_instants(rows[canonical].to_numpy().astype("datetime64[m]"), datetime_format)
        elif canonical == "value":
            text = format_decimals(rows["value"].to_numpy(), rows["_decimals"].to_numpy(), profile.decimal_separator)
        elif canonical == "dose":
            text = format_doses(rows["dose"].to_numpy(), profile.decimal_separator)
        else:
            text = _source_values(profile, canonical, _text(rows[canonical]))
        for i in np.flatnonzero(impossible != None).tolist():  # noqa: E711 - object array
            field, year, month, day = impossible[i]
            if field == canonical:
                when = pd.Timestamp(rows[canonical].iloc[i])
                pattern = datetime_format if canonical in DATETIME_COLUMNS else date_format
                text[i] = impossible_date(pattern, year, month, day, when.hour, when.minute)
        if canonical not in keep_on_delete:
            text[deleted] = ""
        columns.append(text)
    return columns


def _quoted(values: np.ndarray, delimiter: str, quote: str) -> np.ndarray:
    needs_quotes = re.compile("[" + re.escape(delimiter + quote) + "\r\n]").search
    return np.array([quote + v.replace(quote, quote * 2) + quote if needs_quotes(v) else v
                     for v in values.tolist()], dtype=object)


def write_csv(rng: np.random.Generator, rows: pd.DataFrame, dataset: str, profile: CsvProfile) -> WrittenFile:
    """The file's bytes, its data-line count and the defects it carries."""
    delimiter, quote = profile.delimiter, profile.quote
    charset = "utf-8" if profile.encoding == "utf-8-sig" else profile.encoding
    headers = list(profile.columns[dataset])
    fields = [_quoted(column, delimiter, quote) for column in format_rows(rows, dataset, profile)]
    lines = [delimiter.join(parts) for parts in zip(*fields)] if fields else []

    kinds = rows["_defect"].to_numpy()
    picks = rng.random(len(rows))
    encoded: list[bytes] = []
    found: list[tuple[int, str, str | None]] = []
    for i, line in enumerate(lines):
        kind = kinds[i]
        if kind == D.MALFORMED_LINE:
            line = D.malformed_csv_line(line, delimiter, quote, picks[i])
        data = line.encode(charset)
        if kind == D.BAD_ENCODING:
            cut = data.find(delimiter.encode(charset))
            data = data[:cut] + D.bad_bytes(profile.encoding, picks[i]) + data[cut:]
        encoded.append(data)
        if kind and kind != D.DUPLICATE_ROW:
            found.append((len(encoded) + 1, kind, None))
        if kind == D.DUPLICATE_ROW:
            encoded.append(data)
            found.append((len(encoded) + 1, kind, None))

    header = delimiter.join(_quoted(np.array(headers, dtype=object), delimiter, quote)).encode(charset)
    body = LINE_END.encode(charset).join([header, *encoded]) + LINE_END.encode(charset)
    if profile.encoding == "utf-8-sig":
        body = BOM + body
    return WrittenFile(body, len(encoded), found)
