"""Defects injected into the synthetic extracts, and what the pipeline must do with each.

A defective record carries exactly one defect. Field defects (a bad NAM, an
impossible or future date, an unknown code, an empty required field, an
impossible lab value) change the record's values before it is written; line
defects (a malformed line, bytes invalid in the declared charset, an exact
duplicate) change the written line. The writers record each defect, with its
file and line, in the ground truth.

Defects that quarantine a record are only put on records nothing else refers
to (a patient without encounters, facts or consents; an encounter without
facts), so one rejected row never orphans others.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from jobs import reference
from jobs.generate.calendar import FUTURE_MARGIN_DAYS
from jobs.core.schemas import RECORD_REF

INVALID_NAM = "invalid_nam"
IMPOSSIBLE_DATE = "impossible_date"
FUTURE_DATE = "future_date"
UNKNOWN_CODE = "unknown_code"
MISSING_REQUIRED = "missing_required"
DUPLICATE_ROW = "duplicate_row"
MALFORMED_LINE = "malformed_line"
BAD_ENCODING = "bad_encoding"
OUT_OF_RANGE = "out_of_range"

EXPECT_QUARANTINE = "quarantine"
EXPECT_DUPLICATE = "duplicate"
EXPECT_FLAGGED = "flagged"


@dataclass(frozen=True)
class DefectKind:
    name: str
    expected: str
    rule: str


KINDS = {k.name: k for k in (
    DefectKind(INVALID_NAM, EXPECT_FLAGGED, "pseudonymise.invalid_nam"),
    DefectKind(IMPOSSIBLE_DATE, EXPECT_QUARANTINE, "conformance.date"),
    DefectKind(FUTURE_DATE, EXPECT_QUARANTINE, "plausibility.future_date"),
    DefectKind(UNKNOWN_CODE, EXPECT_QUARANTINE, "conformance.code"),
    DefectKind(MISSING_REQUIRED, EXPECT_QUARANTINE, "completeness.required"),
    DefectKind(DUPLICATE_ROW, EXPECT_DUPLICATE, "dedup.exact_duplicate"),
    DefectKind(MALFORMED_LINE, EXPECT_QUARANTINE, "ingest.malformed_line"),
    DefectKind(BAD_ENCODING, EXPECT_QUARANTINE, "ingest.encoding"),
    DefectKind(OUT_OF_RANGE, EXPECT_QUARANTINE, "plausibility.range"),
)}
FIELD_DEFECTS = (INVALID_NAM, IMPOSSIBLE_DATE, FUTURE_DATE, UNKNOWN_CODE, MISSING_REQUIRED, OUT_OF_RANGE)
LINE_DEFECTS = (DUPLICATE_ROW, MALFORMED_LINE, BAD_ENCODING)

# The event date of each dataset: the field a date defect lands on, with the
# fields that move with it so a future record stays internally consistent.
EVENT_DATE = {
    "patient": ("birth_date", ()),
    "encounter": ("visit_start", ("visit_end",)),
    "diagnosis": ("condition_date", ()),
    "lab_result": ("measured_at", ()),
    "medication": ("start_date", ("end_date",)),
    "consent": ("decision_date", ("valid_from", "valid_until")),
}
DATETIME_FIELDS = frozenset({"visit_start", "visit_end", "measured_at"})
MAIN_CODE = {"diagnosis": "condition_code", "lab_result": "loinc_code", "medication": "drug_code"}

# Malformed codes of each system (wrong shape or check digit): a well-formed code lands even when
# the reference lists leave it out, so only a malformed one is a conformance defect.
UNKNOWN_CODES = {
    "condition_code": ("K80..2", "L3.1", "HX5.9", "34.9", "M81-0", "G40.9.1", "E3.9", "I26:9"),
    "loinc_code": ("2160-1", "2345-6", "2093-4", "1751-8", "17861-5", "2885-3"),
    reference.SYSTEM_ATC: ("C09CA1", "N5BA01", "A11CC5X", "M01AE001", "J01FA1O"),
    reference.SYSTEM_DIN: ("2244993", "022467340", "0032692A", "D2241497"),
}


def allowed_kinds(dataset: str, leaf: bool, change: str) -> tuple[str, ...]:
    """Kinds that may hit one row: quarantining ones only on leaves, a bad NAM only on a first delivery."""
    kinds: list[str] = [DUPLICATE_ROW]
    if dataset == "patient" and change == "new":
        kinds.append(INVALID_NAM)
    if leaf:
        kinds += [IMPOSSIBLE_DATE, FUTURE_DATE, MISSING_REQUIRED, MALFORMED_LINE, BAD_ENCODING]
        if dataset in MAIN_CODE:
            kinds.append(UNKNOWN_CODE)
        if dataset == "lab_result":
            kinds.append(OUT_OF_RANGE)
    return tuple(kinds)


def plan_defects(rng: np.random.Generator, rows: pd.DataFrame, dataset: str, rate: float) -> np.ndarray:
    """One defect kind (or ``""``) per row; deletions are never defective."""
    hit = (rng.random(len(rows)) < rate) & (rows["_change"].to_numpy() != "delete")
    pick = rng.random(len(rows))
    kinds = np.full(len(rows), "", dtype=object)
    leaf = rows["_leaf"].to_numpy()
    change = rows["_change"].to_numpy()
    for i in np.flatnonzero(hit).tolist():
        options = allowed_kinds(dataset, bool(leaf[i]), change[i])
        kinds[i] = options[int(pick[i] * len(options))]
    return kinds


def invalid_nam(nam: str, pick: float) -> str:
    """A NAM that fails validation in one of the ways clerks and interfaces break them."""
    variants = (
        lambda n: n[:-1],                       # a digit lost
        lambda n: n[:6] + "13" + n[8:],         # month 13 does not exist
        lambda n: n[:8] + "00" + n[10:],        # day 00
        lambda n: n[:4] + "O" + n[5:],          # letter O typed for a zero
        lambda n: "",                           # not collected
        lambda n: n[:2] + "3" + n[3:],          # digit in the letters
    )
    return variants[int(pick * len(variants))](nam)


def apply_field_defects(rng: np.random.Generator, rows: pd.DataFrame, dataset: str,
                        extracted_at: dt.datetime) -> pd.DataFrame:
    """Change the values of rows that carry a field defect; returns a new frame.

    An impossible date cannot be held by ``datetime64``: it is recorded in
    ``_impossible`` as ``(field, year, month, day)`` for the writer to print.
    """
    rows = rows.copy()
    rows["_impossible"] = None
    rows["_missing"] = None
    kinds = rows["_defect"].to_numpy()
    picks = rng.random(len(rows))
    date_field, moving = EVENT_DATE[dataset]
    local_extract = np.datetime64(extracted_at.replace(tzinfo=None), "m")
    for i in np.flatnonzero(np.isin(kinds, FIELD_DEFECTS)).tolist():
        kind, pick, label = kinds[i], picks[i], rows.index[i]
        if kind == INVALID_NAM:
            rows.at[label, "nam"] = invalid_nam(rows.at[label, "nam"], pick)
        elif kind == IMPOSSIBLE_DATE:
            # A past year: a lenient parser rolling the date over must not make it a future date.
            year = min(int(str(np.datetime64(rows.at[label, date_field], "D"))[:4]), extracted_at.year - 1)
            month, day = ((2, 30), (2, 31), (4, 31), (6, 31), (9, 31), (11, 31))[int(pick * 6)]
            rows.at[label, "_impossible"] = (date_field, year, month, day)
        elif kind == FUTURE_DATE:
            old = np.datetime64(rows.at[label, date_field], "m")
            target = local_extract + np.timedelta64(FUTURE_MARGIN_DAYS + int(pick * 365), "D")
            shift = (target - old).astype("timedelta64[D]").astype("timedelta64[m]") + np.timedelta64(1, "D")
            for field in (date_field, *moving):
                value = rows.at[label, field]
                if not pd.isna(value):
                    rows.at[label, field] = pd.Timestamp(np.datetime64(value, "m") + shift)
        elif kind == UNKNOWN_CODE:
            column = MAIN_CODE[dataset]
            pool = UNKNOWN_CODES[rows.at[label, "drug_system"] if dataset == "medication" else column]
            rows.at[label, column] = pool[int(pick * len(pool))]
        elif kind == MISSING_REQUIRED:
            fields = [RECORD_REF[dataset]] + ([] if dataset == "patient" else ["patient_ref"])
            fields += [MAIN_CODE[dataset]] if dataset in MAIN_CODE else []
            field = fields[int(pick * len(fields))]
            rows.at[label, field] = ""
            rows.at[label, "_missing"] = field
        elif kind == OUT_OF_RANGE:
            test = reference.loinc()[rows.at[label, "loinc_code"]]
            rows.at[label, "value"] = round(test.plausible_high * (2 + 8 * pick) + 1, test.decimals)
    return rows


# ------------------------------------------------------------ line level ----

# Bytes that cannot be read in the declared charset: a latin-1 "é" inside UTF-8,
# and Windows-1252 punctuation (C1 controls in latin-1).
BAD_BYTES_UTF8 = (b"\xe9", b"\xc3\x28", b"\xff\xfe", b"\xed\xa0\x80")
BAD_BYTES_LATIN1 = (b"\x92", b"\x85", b"\x96", b"\x80", b"\x9c")


def bad_bytes(encoding: str, pick: float) -> bytes:
    pool = BAD_BYTES_LATIN1 if encoding.lower() in ("latin-1", "iso-8859-1") else BAD_BYTES_UTF8
    return pool[int(pick * len(pool))]


def malformed_csv_line(line: str, delimiter: str, quote: str, pick: float) -> str:
    """Too few fields, too many fields, or characters after a field's closing quote.

    (An opening quote never closed is not a line defect: a quoted field may
    span lines, so it runs to the next quote and takes the lines between.)
    """
    variant = int(pick * 3)
    if variant == 0:
        return line[: line.rfind(delimiter)]
    if variant == 1:
        return line + delimiter + "?"
    first = line.find(delimiter)
    second = line.find(delimiter, first + 1)
    end = second if second != -1 else len(line)
    return line[: first + 1] + quote + line[first + 1:end] + quote + "x" + line[end:]


def truncated_json(text: str, pick: float) -> str:
    """A resource cut short, as a failed export leaves it."""
    return text[: max(1, int(len(text) * (0.3 + 0.5 * pick)))]
