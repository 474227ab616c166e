"""Canonical UCUM unit per LOINC code, and conversions between UCUM units by a UCUM library.

``config/terminology/units.yaml`` declares, per LOINC code, the one unit its
values are stored in (``value_as_number``) and, for analytes reported both as
mass and as substance concentration, the molar mass (g/mol) that lets one
convert into the other. Without a declared molar mass, mg/dL never becomes
mmol/L: a conversion the configuration does not vouch for is not made.

Units are parsed and converted by ``ucumvert`` (UCUM's grammar, over ``pint``),
not by a hand-written table: any UCUM unit of the right dimension converts.
Conversions are affine (``target = source × factor + offset``) so that
temperatures convert too.

Example::

    units = load_units(Path("config/terminology"))[0]
    units.conversion("14749-6", "mg/dL")   # Conversion('mmol/L', 0.0555…, 0.0)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

UNITS_FILE = "units.yaml"


@dataclass(frozen=True)
class CanonicalUnit:
    unit: str
    molar_mass: float | None = None


@dataclass(frozen=True)
class Conversion:
    unit: str
    factor: float
    offset: float


@dataclass(frozen=True)
class CanonicalUnits:
    """The canonical unit of each LOINC code; ``map_ref`` (``units|<version>``) is recorded on converted rows."""

    version: str
    tests: dict[str, CanonicalUnit] = field(default_factory=dict)

    @property
    def map_ref(self) -> str:
        return f"units|{self.version}"

    def conversion(self, loinc: str | None, unit: str | None) -> Conversion | None:
        """How a value of ``loinc`` sent in ``unit`` becomes its canonical unit; None when it cannot."""
        canonical = self.tests.get(loinc or "")
        if canonical is None or unit is None:
            return None
        return convert(unit, canonical.unit, canonical.molar_mass)


@cache
def _registry():
    """The UCUM registry, once per process. Parsing pint's and UCUM's definition files is most of its
    cost (seconds, at every command that loads the configuration): pint keeps the parsed definitions in
    a cache folder, used when one private to the user can be had. A cache file another process is
    writing at that moment fails to load: the registry is then built without the cache."""
    from ucumvert import PintUcumRegistry

    folder = _definitions_cache()
    if folder is not None:
        try:
            return PintUcumRegistry(cache_folder=folder)
        except Exception:  # noqa: BLE001 - a truncated or stale cache file: pickle, EOF and pint errors alike
            pass
    return PintUcumRegistry()


def _definitions_cache(base: Path | None = None) -> Path | None:
    """``.cache/pint`` in the project (ignored by git, beside the cached jars); None when it cannot be made,
    or when others may write to it (pint loads pickles from it: only a folder of the user's own, closed to
    everyone else, is used)."""
    from jobs.core.settings import PROJECT_ROOT

    base = base or PROJECT_ROOT / ".cache" / "pint"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        found = base.stat()
    except OSError:
        return None
    if found.st_uid != os.getuid() or found.st_mode & 0o077:
        return None
    return base


def _spellings(unit: str) -> list[str]:
    # Establishments write µ for UCUM's u, and spaces inside units.
    cleaned = unit.strip().replace("µ", "u").replace("μ", "u").replace(" ", "")
    return [unit.strip()] + ([cleaned] if cleaned != unit.strip() else [])


@cache
def parse(unit: str):
    """The pint unit of a UCUM expression; None when it is not UCUM."""
    registry = _registry()
    for spelling in _spellings(unit):
        try:
            parsed = registry.from_ucum(spelling)
            (1 * parsed).to_base_units()  # an annotation-only parse is not a unit
            return parsed
        except Exception:  # noqa: BLE001 - ucumvert raises lark, pint and attribute errors alike
            continue
    return None


@cache
def convert(source: str, target: str, molar_mass: float | None = None) -> Conversion | None:
    """Affine conversion from ``source`` to ``target`` UCUM units, through ``molar_mass`` (g/mol) between
    mass and substance concentrations; None when the units are unknown or of different dimensions."""
    if source.strip() == target.strip():
        # Annotations ({score}) are units of their own: equal spellings need no library to agree.
        return Conversion(target, 1.0, 0.0)
    src, dst = parse(source), parse(target)
    if src is None or dst is None:
        return None
    registry = _registry()

    def apply(value: float) -> float | None:
        quantity = registry.Quantity(value, src)
        try:
            return float(quantity.to(dst).magnitude)
        except Exception:  # noqa: BLE001 - pint's DimensionalityError and offset errors
            pass
        if molar_mass is None:
            return None
        mass, substance = registry.Quantity(1, "g/L").dimensionality, registry.Quantity(1, "mol/L").dimensionality
        try:
            if quantity.dimensionality == mass and dst.dimensionality == substance:
                return float(registry.Quantity(quantity.to("g/L").magnitude / molar_mass, "mol/L").to(dst).magnitude)
            if quantity.dimensionality == substance and dst.dimensionality == mass:
                return float(registry.Quantity(quantity.to("mol/L").magnitude * molar_mass, "g/L").to(dst).magnitude)
        except Exception:  # noqa: BLE001
            return None
        return None

    at0, at1 = apply(0.0), apply(1.0)
    if at0 is None or at1 is None:
        return None
    return Conversion(target, at1 - at0, at0)


def load_units(folder: Path) -> tuple[CanonicalUnits, list[tuple[str, str, str]]]:
    """``units.yaml`` of the terminology folder, and its problems (file, entry, reason)."""
    rel = f"terminology/{UNITS_FILE}"
    path = Path(folder) / UNITS_FILE
    if not path.exists():
        return CanonicalUnits("0"), []
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        return CanonicalUnits("0"), [(rel, "-", f"not valid YAML: {exc}")]
    problems = []
    version = str(data.get("version") or "")
    if not version:
        problems.append((rel, "version", "declare the version recorded on every converted row"))
    tests: dict[str, CanonicalUnit] = {}
    from jobs.reference.vocabularies import is_well_formed

    for code, spec in (data.get("tests") or {}).items():
        entry = f"tests.{code}"
        if not is_well_formed("LOINC", str(code)):
            problems.append((rel, entry, "not a well-formed LOINC code"))
            continue
        spec = spec if isinstance(spec, dict) else {"unit": spec}
        unit, molar_mass = spec.get("unit"), spec.get("molar_mass")
        annotation = isinstance(unit, str) and re.fullmatch(r"\{[^{}]+\}", unit.strip()) is not None
        if not isinstance(unit, str) or (parse(unit) is None and not annotation):
            problems.append((rel, f"{entry}.unit", f"{unit!r} is not a UCUM unit"))
            continue
        if molar_mass is not None and (not isinstance(molar_mass, (int, float)) or molar_mass <= 0):
            problems.append((rel, f"{entry}.molar_mass", "a molar mass is a positive number of g/mol"))
            continue
        tests[str(code)] = CanonicalUnit(unit, float(molar_mass) if molar_mass is not None else None)
    return CanonicalUnits(version, tests), problems
