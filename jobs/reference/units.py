"""UCUM unit conversions, so that a plausibility bound declared in one unit judges values sent in another.

Each LOINC test of the reference list declares its bounds in one UCUM unit
(``loinc.csv``, column ``unit``). A value sent in another unit is converted
into that unit before the check; when no conversion is known the bound is not
applied and the validation report counts the row. A unit is never a reason
to reject a row.

Conversions are factors, ``value in target = value in source × factor``:

- :data:`FACTORS`: unit pairs whatever the analyte (mass, length, mass
  concentration, counts per volume); each pair is also read the other way
  (factor inverted);
- :data:`MOLAR_MASS`: g/mol of the analytes whose mass and molar
  concentrations are both in use (glucose mg/dL ↔ mmol/L …), by LOINC code of
  the test in the reference list; a mass concentration converts to a molar one
  through it.

Units are compared after :func:`unit_key` (case-insensitive, ``µ`` written
``u``, ``^`` written ``*``): establishments write ``mmol/l`` and ``µmol/L``.

Example::

    from jobs.reference.units import conversion_factor

    conversion_factor("g/dL", "g/L")                 # 10.0
    conversion_factor("mg/dL", "mmol/L", "14749-6")  # 0.0555… (glucose, 180.156 g/mol)
"""

from __future__ import annotations

# Unit pairs, value_in_target = value_in_source * factor.
FACTORS: dict[tuple[str, str], float] = {
    # mass concentration
    ("g/dL", "g/L"): 10.0,
    ("mg/dL", "g/L"): 0.01,
    ("mg/L", "g/L"): 0.001,
    ("mg/dL", "mg/L"): 10.0,
    ("ug/L", "ng/L"): 1000.0,
    ("pg/mL", "ng/L"): 1.0,
    ("ng/mL", "ng/L"): 1000.0,
    # substance concentration
    ("mol/L", "mmol/L"): 1000.0,
    ("mmol/L", "umol/L"): 1000.0,
    ("mol/L", "umol/L"): 1_000_000.0,
    # counts per volume (10*9/L = 10*3/uL = /nL)
    ("10*3/uL", "10*9/L"): 1.0,
    ("/nL", "10*9/L"): 1.0,
    # enzyme and arbitrary units per volume
    ("U/L", "[IU]/L"): 1.0,
    ("u[IU]/mL", "m[IU]/L"): 1.0,
    ("mU/L", "m[IU]/L"): 1.0,
    # length
    ("m", "cm"): 100.0,
    ("mm", "cm"): 0.1,
    ("[in_i]", "cm"): 2.54,
    ("[ft_i]", "cm"): 30.48,
    # mass
    ("kg", "g"): 1000.0,
    ("[lb_av]", "kg"): 0.45359237,
    ("[oz_av]", "kg"): 0.028349523125,
    ("g", "kg"): 0.001,
    # pressure
    ("kPa", "mm[Hg]"): 7.50061683,
}

# g/mol of analytes reported both as mass and as substance concentration, by LOINC code.
MOLAR_MASS: dict[str, float] = {
    "14749-6": 180.156,   # glucose
    "14682-9": 113.12,    # creatinine
    "14647-2": 386.654,   # cholesterol
    "22748-8": 386.654,   # cholesterol in LDL
    "14646-4": 386.654,   # cholesterol in HDL
    "14927-8": 885.7,     # triglycerides (as triolein)
    "2823-3": 39.098,     # potassium
    "2951-2": 22.990,     # sodium
}

# Mass concentrations in g/L, substance concentrations in mol/L.
_MASS_IN_G_PER_L = {"g/L": 1.0, "g/dL": 10.0, "mg/dL": 0.01, "mg/L": 0.001}
_SUBSTANCE_IN_MOL_PER_L = {"mol/L": 1.0, "mmol/L": 0.001, "umol/L": 0.000001}


def unit_key(unit: str) -> str:
    """How units are compared: case-insensitive, ``µ`` as ``u``, ``^`` as ``*``, no spaces."""
    return unit.strip().replace("µ", "u").replace("μ", "u").replace("^", "*").replace(" ", "").lower()


def _pairs() -> dict[tuple[str, str], float]:
    found: dict[tuple[str, str], float] = {}
    for (source, target), factor in FACTORS.items():
        found[(unit_key(source), unit_key(target))] = factor
        found.setdefault((unit_key(target), unit_key(source)), 1.0 / factor)
    return found


_PAIRS = _pairs()


def known_units() -> set[str]:
    """Every unit a conversion is known for (as written in the tables)."""
    units = {u for pair in FACTORS for u in pair}
    return units | set(_MASS_IN_G_PER_L) | set(_SUBSTANCE_IN_MOL_PER_L)


def conversion_factor(source: str, target: str, loinc_code: str | None = None) -> float | None:
    """The factor from ``source`` to ``target`` (``None`` when no conversion is known).

    ``loinc_code`` allows mass ↔ substance concentrations for analytes of :data:`MOLAR_MASS`.
    """
    s, t = unit_key(source), unit_key(target)
    if s == t:
        return 1.0
    if (s, t) in _PAIRS:
        return _PAIRS[(s, t)]
    mass = {unit_key(u): f for u, f in _MASS_IN_G_PER_L.items()}
    substance = {unit_key(u): f for u, f in _SUBSTANCE_IN_MOL_PER_L.items()}
    molar_mass = MOLAR_MASS.get(loinc_code or "")
    if molar_mass is None:
        return None
    if s in mass and t in substance:
        return mass[s] / molar_mass / substance[t]
    if s in substance and t in mass:
        return substance[s] * molar_mass / mass[t]
    return None


def conversions_to(target: str, loinc_code: str | None = None) -> dict[str, float]:
    """``unit_key(source) → factor`` for every known unit convertible into ``target``."""
    found = {unit_key(target): 1.0}
    for unit in known_units():
        factor = conversion_factor(unit, target, loinc_code)
        if factor is not None:
            found.setdefault(unit_key(unit), factor)
    return found
