"""Plausibility bounds judge values in the bound's unit: converted first, never rejected for a unit."""

import pytest

from jobs.reference.units import conversion_factor, conversions_to, unit_key


@pytest.mark.parametrize("source, target, code, factor", [
    ("g/dL", "g/L", None, 10.0),
    ("g/L", "g/dL", None, 0.1),
    ("cm", "m", None, 0.01),
    ("[lb_av]", "kg", None, 0.45359237),
    ("mg/dL", "mmol/L", "14749-6", 10 / 180.156),     # glucose
    ("mmol/L", "mg/dL", "14749-6", 180.156 / 10),
    ("mg/dL", "umol/L", "14682-9", 10_000 / 113.12),  # creatinine, the familiar 88.4
    ("mmol/l", "mmol/L", None, 1.0),                   # spelling only
    ("µmol/L", "umol/L", None, 1.0),
])
def test_known_conversions(source, target, code, factor):
    assert conversion_factor(source, target, code) == pytest.approx(factor)


def test_no_conversion_is_invented():
    assert conversion_factor("mg/dL", "mmol/L") is None           # needs the analyte's molar mass
    assert conversion_factor("mg/dL", "mmol/L", "718-7") is None  # haemoglobin has none declared
    assert conversion_factor("%", "g/L") is None
    assert conversions_to("g/L")[unit_key("g/dL")] == pytest.approx(10.0)
