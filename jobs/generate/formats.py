"""Value formats shared by the writers: dates in a profile's pattern, decimals, NAM.

Dates are kept as numpy ``datetime64`` until the last moment and formatted per
unique value, so formatting millions of rows costs one ``strftime`` per distinct
day or minute.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata

import numpy as np

NAT_DAY = np.datetime64("NaT", "D")
NAT_MINUTE = np.datetime64("NaT", "m")


class UnsupportedDatePattern(ValueError):
    """A profile's date pattern uses a Spark token the generator cannot write."""


_SPARK_TOKENS = (("yyyy", "%Y"), ("yy", "%y"), ("MM", "%m"), ("dd", "%d"),
                 ("HH", "%H"), ("mm", "%M"), ("ss", "%S"))


def spark_to_strftime(pattern: str) -> str:
    """Translate a Spark datetime pattern (``dd/MM/yyyy HH:mm``, ``yyyy-MM-dd'T'HH:mm:ss``) to strftime."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "'":
            end = pattern.find("'", i + 1)
            if end < 0:
                raise UnsupportedDatePattern(f"unbalanced quote in date pattern {pattern!r}")
            out.append(pattern[i + 1:end].replace("%", "%%") or "'")
            i = end + 1
            continue
        for token, directive in _SPARK_TOKENS:
            if pattern.startswith(token, i):
                out.append(directive)
                i += len(token)
                break
        else:
            if char.isalpha():
                raise UnsupportedDatePattern(
                    f"date pattern {pattern!r}: token starting at {char!r} is not supported; "
                    f"use {', '.join(t for t, _ in _SPARK_TOKENS)}")
            out.append(char.replace("%", "%%"))
            i += 1
    return "".join(out)


def format_instants(values: np.ndarray, strftime: str) -> np.ndarray:
    """Format ``datetime64`` values (day or minute resolution); NaT becomes ``""``."""
    values = np.asarray(values)
    out = np.full(len(values), "", dtype=object)
    present = ~np.isnat(values)
    if present.any():
        unique, inverse = np.unique(values[present], return_inverse=True)
        as_python = unique.astype("datetime64[s]").astype(object)
        out[present] = np.array([v.strftime(strftime) for v in as_python], dtype=object)[inverse]
    return out


def impossible_date(strftime: str, year: int, month: int, day: int, hour: int = 8, minute: int = 0) -> str:
    """A date that does not exist (``31/02/2021``) written in the profile's pattern."""
    return dt.datetime(year, month, 1, hour, minute).strftime(strftime.replace("%d", f"{day:02d}"))


def format_decimals(values: np.ndarray, decimals: np.ndarray | int, separator: str) -> np.ndarray:
    """Fixed-point text with the profile's decimal separator; NaN becomes ``""``."""
    values = np.asarray(values, dtype=float)
    decimals = np.broadcast_to(np.asarray(decimals, dtype=int), values.shape)
    out = np.array([("" if v != v else f"{v:.{d}f}") for v, d in zip(values.tolist(), decimals.tolist())],
                   dtype=object)
    if separator != ".":
        out = np.array([s.replace(".", separator) for s in out], dtype=object)
    return out


def format_doses(values: np.ndarray, separator: str) -> np.ndarray:
    """Doses as prescribed (``2.5``, ``500``); NaN becomes ``""``."""
    out = np.array([("" if v != v else f"{v:g}") for v in np.asarray(values, dtype=float).tolist()], dtype=object)
    if separator != ".":
        out = np.array([s.replace(".", separator) for s in out], dtype=object)
    return out


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


# ------------------------------------------------------------------- NAM ----

NAM_PATTERN = re.compile(r"^[A-Z]{4}\d{8}$")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def nam_prefix(family_name: str, given_name: str) -> str:
    """RAMQ letters: three of the family name (padded with X), one of the given name."""
    family = re.sub(r"[^A-Z]", "", strip_accents(family_name).upper())
    given = re.sub(r"[^A-Z]", "", strip_accents(given_name).upper())
    return (family[:3] + "XXX")[:3] + (given[:1] or "X")


def is_valid_nam(nam: str | None) -> bool:
    """Québec NAM: 4 letters, birth year, month (+50 for women), day, 2 administrative digits."""
    if not nam or not NAM_PATTERN.match(nam):
        return False
    month, day = int(nam[6:8]), int(nam[8:10])
    if month > 50:
        month -= 50
    return 1 <= month <= 12 and 1 <= day <= _DAYS_IN_MONTH[month - 1]


# ------------------------------------------------------------- FHIR time ----


def _nth_sunday(year: int, month: int, n: int) -> dt.date:
    first = dt.date(year, month, 1)
    return first + dt.timedelta(days=(6 - first.weekday()) % 7 + 7 * (n - 1))


def eastern_offsets(values: np.ndarray) -> np.ndarray:
    """UTC offset (``-04:00`` or ``-05:00``) of local Québec times, by date (DST rule since 2007)."""
    values = np.asarray(values, dtype="datetime64[m]")
    days = values.astype("datetime64[D]")
    years = days.astype("datetime64[Y]").astype(int) + 1970
    out = np.full(len(values), "-05:00", dtype=object)
    for year in np.unique(years[~np.isnat(days)]):
        start = np.datetime64(_nth_sunday(int(year), 3, 2))
        end = np.datetime64(_nth_sunday(int(year), 11, 1))
        out[(years == year) & (days >= start) & (days < end)] = "-04:00"
    return out


def fhir_datetimes(values: np.ndarray) -> np.ndarray:
    """FHIR ``dateTime`` with seconds and the local offset; NaT becomes ``""``."""
    text = format_instants(values, "%Y-%m-%dT%H:%M:%S")
    offsets = eastern_offsets(values)
    return np.array([t + o if t else "" for t, o in zip(text.tolist(), offsets.tolist())], dtype=object)
