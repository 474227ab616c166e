"""Reference code lists: the codes a clean record may carry.

Three CSV files sit beside this module:

- ``icd10ca.csv`` (``code,display,condition_group``): ICD-10-CA diagnoses;
- ``loinc.csv`` (``code,display,unit,typical_low,typical_high,plausible_low,plausible_high``):
  laboratory tests with their UCUM unit; a value outside the plausible bounds is
  physiologically impossible, one outside the typical bounds is merely abnormal;
- ``drugs.csv`` (``code,system,display,dose_unit,route``): medications coded in
  ATC (substances) or DIN (Health Canada products; the DINs listed are
  illustrative).

A code outside these lists is unknown to Affluent and its record is rejected.

Example::

    from jobs.reference import codes, loinc

    "E11.9" in codes("ICD-10-CA")            # True
    loinc()["2823-3"].plausible_high          # 10.0
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent

# Code systems as written in CSV extracts (``condition_system``, ``drug_system``).
SYSTEM_ICD10CA = "ICD-10-CA"
SYSTEM_LOINC = "LOINC"
SYSTEM_ATC = "ATC"
SYSTEM_DIN = "DIN"

# The same systems as FHIR ``Coding.system`` URIs.
FHIR_SYSTEM_URIS = {
    SYSTEM_ICD10CA: "https://fhir.infoway-inforoute.ca/CodeSystem/icd10ca",
    SYSTEM_LOINC: "http://loinc.org",
    SYSTEM_ATC: "http://www.whocc.no/atc",
    SYSTEM_DIN: "http://hl7.org/fhir/NamingSystem/ca-hc-din",
}
SYSTEMS_BY_FHIR_URI = {uri: system for system, uri in FHIR_SYSTEM_URIS.items()}
UCUM_URI = "http://unitsofmeasure.org"


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


def _rows(name: str, header: tuple[str, ...]) -> list[dict[str, str]]:
    path = REFERENCE_DIR / name
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != header:
            raise ReferenceListError(f"{path}: header must be {','.join(header)}, not {reader.fieldnames}")
        rows = list(reader)
    codes = [row["code"] for row in rows]
    if len(set(codes)) != len(codes):
        raise ReferenceListError(f"{path}: duplicate codes")
    return rows


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


@cache
def icd10ca() -> dict[str, Diagnosis]:
    """ICD-10-CA diagnoses by code, in file order."""
    rows = _rows("icd10ca.csv", ("code", "display", "condition_group"))
    return {r["code"]: Diagnosis(r["code"], r["display"], r["condition_group"]) for r in rows}


@cache
def loinc() -> dict[str, LabTest]:
    """LOINC laboratory tests by code, in file order."""
    rows = _rows("loinc.csv", ("code", "display", "unit", "typical_low", "typical_high",
                               "plausible_low", "plausible_high"))
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
    """Medications by code (ATC and DIN codes never collide), in file order."""
    rows = _rows("drugs.csv", ("code", "system", "display", "dose_unit", "route"))
    found = {r["code"]: Drug(r["code"], r["system"], r["display"], r["dose_unit"], r["route"]) for r in rows}
    bad = sorted({d.system for d in found.values()} - {SYSTEM_ATC, SYSTEM_DIN})
    if bad:
        raise ReferenceListError(f"drugs.csv: unknown system(s) {bad}; use {SYSTEM_ATC} or {SYSTEM_DIN}")
    return found


def codes(system: str) -> frozenset[str]:
    """Every known code of one system (``ICD-10-CA``, ``LOINC``, ``ATC``, ``DIN``)."""
    if system == SYSTEM_ICD10CA:
        return frozenset(icd10ca())
    if system == SYSTEM_LOINC:
        return frozenset(loinc())
    if system in (SYSTEM_ATC, SYSTEM_DIN):
        return frozenset(code for code, drug in drugs().items() if drug.system == system)
    raise ReferenceListError(f"unknown code system {system!r}; use one of {', '.join(FHIR_SYSTEM_URIS)}")
