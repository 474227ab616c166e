"""Reference lists: display names and plausibility bounds for the codes Affluent knows well.

A code is valid when it is well formed for its system
(:mod:`jobs.reference.vocabularies`); these lists are an overlay that adds
names, groups, units and bounds. A well-formed code missing from them lands
and is counted as "not in reference list" in the validation report.

Three CSV files sit beside this module:

- ``icd10ca.csv`` (``code,display,condition_group``): ICD-10-CA diagnoses;
- ``loinc.csv`` (``code,display,unit,typical_low,typical_high,plausible_low,plausible_high``):
  laboratory tests with their UCUM unit; a value outside the plausible bounds is
  physiologically impossible, one outside the typical bounds is merely abnormal;
- ``drugs.csv`` (``code,system,display,dose_unit,route``): medications coded in
  ATC (substances), DIN (Health Canada products; the DINs listed are
  illustrative) or RxNorm.

The consortium extends them without code: a file of the same name and header
under ``config/reference/`` (the configuration folder, ``AFFLUENT_CONFIG_DIR``)
adds its rows, and replaces a row of the same code. Every code of a list must be
well formed for its system.

Example::

    from jobs.reference import codes, loinc

    "E11.9" in codes("ICD-10-CA")            # True
    loinc()["2823-3"].plausible_high          # 10.0
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from jobs.reference import vocabularies
from jobs.reference.vocabularies import BY_VOCABULARY, UCUM_URI, is_well_formed  # noqa: F401  (UCUM_URI: re-exported)

REFERENCE_DIR = Path(__file__).resolve().parent
# Where the consortium's own lists live: ``<config>/reference/<list>.csv``.
ENV_CONFIG_DIR = "AFFLUENT_CONFIG_DIR"
_DEFAULT_CONFIG_DIR = REFERENCE_DIR.parents[1] / "config"

# Code systems as written in CSV extracts (``condition_system``, ``drug_system``).
SYSTEM_ICD10CA = BY_VOCABULARY["ICD10CA"].name
SYSTEM_LOINC = BY_VOCABULARY["LOINC"].name
SYSTEM_ATC = BY_VOCABULARY["ATC"].name
SYSTEM_DIN = BY_VOCABULARY["DIN"].name
SYSTEM_RXNORM = BY_VOCABULARY["RxNorm"].name

# Systems as FHIR ``Coding.system`` URIs (the one Affluent writes).
FHIR_SYSTEM_URIS = {s.name: s.uris[0] for s in vocabularies.SYSTEMS}
SYSTEMS_BY_FHIR_URI = dict(vocabularies.NAMES_BY_FHIR_URI)
DRUG_SYSTEMS = tuple(BY_VOCABULARY[v].name for v in vocabularies.DRUG_VOCABULARIES)


class ReferenceListError(Exception):
    """A reference list is missing or malformed."""


@dataclass(frozen=True)
class Diagnosis:
    code: str
    display: str
    condition_group: str


@dataclass(frozen=True)
class LabTest:
    code: str
    display: str
    unit: str
    typical_low: float
    typical_high: float
    plausible_low: float
    plausible_high: float
    # Decimals a laboratory reports, read from how the typical bounds are written.
    decimals: int

    def is_plausible(self, value: float) -> bool:
        return self.plausible_low <= value <= self.plausible_high


@dataclass(frozen=True)
class Drug:
    code: str
    system: str
    display: str
    dose_unit: str
    route: str


def overlay_dirs() -> list[Path]:
    """The folders reference lists are read from, in order: this package, then the consortium's."""
    config = Path(os.environ.get(ENV_CONFIG_DIR, _DEFAULT_CONFIG_DIR)) / "reference"
    return [REFERENCE_DIR] + ([config] if config.is_dir() else [])


def _rows(name: str, header: tuple[str, ...], system: str | None = None) -> list[dict[str, str]]:
    """Rows of one list, the package's then the consortium's (a later row replaces one of the same code)."""
    merged: dict[str, dict[str, str]] = {}
    for folder in overlay_dirs():
        path = folder / name
        if not path.is_file():
            continue
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != header:
                raise ReferenceListError(f"{path}: header must be {','.join(header)}, not {reader.fieldnames}")
            rows = list(reader)
        codes = [row["code"] for row in rows]
        if len(set(codes)) != len(codes):
            raise ReferenceListError(f"{path}: duplicate codes")
        for row in rows:
            row_system = system or row.get("system", "")
            if not is_well_formed(row_system, row["code"]):
                raise ReferenceListError(f"{path}: {row['code']!r} is not a well-formed {row_system} code")
            merged[row["code"]] = row
    return list(merged.values())


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


@cache
def icd10ca() -> dict[str, Diagnosis]:
    """ICD-10-CA diagnoses by code, in file order."""
    rows = _rows("icd10ca.csv", ("code", "display", "condition_group"), SYSTEM_ICD10CA)
    return {r["code"]: Diagnosis(r["code"], r["display"], r["condition_group"]) for r in rows}


@cache
def loinc() -> dict[str, LabTest]:
    """LOINC laboratory tests by code, in file order."""
    rows = _rows("loinc.csv", ("code", "display", "unit", "typical_low", "typical_high",
                               "plausible_low", "plausible_high"), SYSTEM_LOINC)
    tests = {}
    for r in rows:
        test = LabTest(r["code"], r["display"], r["unit"], float(r["typical_low"]), float(r["typical_high"]),
                       float(r["plausible_low"]), float(r["plausible_high"]),
                       max(_decimals(r["typical_low"]), _decimals(r["typical_high"])))
        if not test.plausible_low <= test.typical_low < test.typical_high <= test.plausible_high:
            raise ReferenceListError(f"loinc.csv: {test.code}: bounds must satisfy "
                                  "plausible_low <= typical_low < typical_high <= plausible_high")
        tests[test.code] = test
    return tests


@cache
def drugs() -> dict[str, Drug]:
    """Medications by code (ATC, DIN and RxNorm codes never collide: letters, 8 digits, up to 8), in file order."""
    rows = _rows("drugs.csv", ("code", "system", "display", "dose_unit", "route"))
    found = {r["code"]: Drug(r["code"], r["system"], r["display"], r["dose_unit"], r["route"]) for r in rows}
    bad = sorted({d.system for d in found.values()} - set(DRUG_SYSTEMS))
    if bad:
        raise ReferenceListError(f"drugs.csv: unknown system(s) {bad}; use one of {', '.join(DRUG_SYSTEMS)}")
    return found


def codes(system: str) -> frozenset[str]:
    """Every code a reference list holds for one system (``ICD-10-CA``, ``LOINC``, ``ATC``, ``DIN``, ``RxNorm``)."""
    if system == SYSTEM_ICD10CA:
        return frozenset(icd10ca())
    if system == SYSTEM_LOINC:
        return frozenset(loinc())
    if system in DRUG_SYSTEMS:
        return frozenset(code for code, drug in drugs().items() if drug.system == system)
    raise ReferenceListError(f"no reference list for code system {system!r}; lists exist for "
                             f"{', '.join((SYSTEM_ICD10CA, SYSTEM_LOINC, *DRUG_SYSTEMS))}")
