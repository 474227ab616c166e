"""Terminology: one meaning across establishments.

Every coded fact in silver keeps, as OMOP does, its source value, its source
concept (the code system beside it) and a standard concept derived from
configuration:

- :mod:`jobs.terminology.maps`: FHIR R4 ConceptMap resources under
  ``config/terminology/`` (consortium-wide) and ``config/terminology/<establishment>/``
  (overrides), loaded and checked;
- :mod:`jobs.terminology.units`: canonical UCUM unit per LOINC code and the
  conversions between UCUM units (``ucumvert`` over ``pint``);
- :mod:`jobs.terminology.concepts`: the DataFrame transforms that add the
  standard columns from silver's own source columns (so they can be
  re-derived from silver alone);
- :mod:`jobs.terminology.coverage`: share of rows and of distinct source
  values mapped, most frequent unmapped values;
- :mod:`jobs.terminology.remap`: the maintenance task that re-derives silver's
  concept columns after a map changed.

See ``docs/terminology.md``.
"""
