"""Coded fields hold codes: a value outside its vocabulary never leaves bronze.

Free text is dropped where the schema says text; the columns that silver calls
a code, a unit, a care site or a type are kept, and an establishment's system
accepts anything typed into them: a name and address in the care-site field,
a name in the unit field. Such a value would reach staged, silver, the
extracts and the commit logs. So, before staged is written, every coded column
is checked against

- **codes** (``condition_source_value``, ``measurement_source_value``,
  ``drug_source_value``, ``visit_reason_source_value``): well formed for their system
  (:func:`jobs.reference.vocabularies.well_formed`); with no known system, a
  short code token with a digit (:data:`UNKNOWN_SYSTEM_CODE`);
- **units** (``unit_source_value``, ``dose_unit_source_value``): the UCUM
  grammar (``ucumvert``) without annotations (``{…}`` is free text in UCUM),
  or a unit the configuration declares (canonical units, reference lists,
  the profile's ``value_maps`` and ``coded_values``);
- **types** (visit type, diagnosis type, route, sex, consent purpose and
  decision, a lab result's category): the shared vocabulary (concept-map source codes, canonical
  values, the reference lists' routes, declared purposes) plus the words the
  establishment declares under ``coded_values``; a route may also be a
  SNOMED CT identifier (digits);
- **care sites**: the establishment's ``care_sites`` list; without one
  (fail closed), a short unit code with a digit (:data:`CARE_SITE_CODE`).

A value that does not conform is replaced by a mask that says only its kind
and length (``[masked:letters:14]``) and the row carries ``coded:<column>``
in ``_parse_errors``: validation quarantines it under
``conformance.coded_field`` (``conformance.code`` first for a code, a sex, a
purpose or a decision, which have their own rule). Neither the staged row, nor
the quarantine record, nor any statistic ever holds the value.

Example::

    vocabulary = declared_vocabulary(consortium, "chu_laurentides", units=["mmol/L", "Jean Tremblay"])
    staged = guard_coded_fields(pseudo, "lab_result", vocabulary)   # unit 'Jean Tremblay' masked
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs import reference
from jobs.core.config import Consortium
from jobs.reference import vocabularies

# The ``_parse_errors`` entry of a masked column, and the rule validation quarantines it under.
CODED_ERROR_PREFIX = "coded:"
RULE_CODED_FIELD = "conformance.coded_field"

# A care site of an establishment that declares no list: a short unit code with at least one digit
# (``4N``, ``U-07``, ``CLIN12``). Names and addresses of persons have no digit or are longer.
CARE_SITE_CODE = r"^(?=.*[0-9])[A-Za-z0-9][A-Za-z0-9._/-]{0,11}$"
# A code whose system is unknown (its row is quarantined for the system anyway): kept only code-shaped.
UNKNOWN_SYSTEM_CODE = r"^(?=.*[0-9])[A-Z0-9][A-Z0-9._:-]{0,19}$"
# SNOMED CT identifiers (a FHIR route coding): digits only.
SNOMED_ID = r"^[0-9]{6,18}$"
# Longest unit accepted (UCUM expressions of the lists are far shorter).
MAX_UNIT_LENGTH = 30

# Canonical words of the type columns whatever the configuration says.
GENDERS = ("female", "male", "other", "unknown")
DECISIONS = ("permit", "deny", "withdraw")
DIAGNOSIS_TYPES = (
    "principal", "secondary", "admitting", "discharge", "comorbidity", "complication",
    # FHIR condition-category codes
    "encounter-diagnosis", "problem-list-item", "health-concern",
)
ROUTES = (
    "po", "sc", "iv", "im", "sl", "pr", "td", "inh", "top", "in", "id", "neb",
    "oral", "subcutaneous", "intravenous", "intramuscular", "sublingual", "rectal", "transdermal",
    "inhalation", "topical", "intranasal", "intradermal", "ophthalmic", "otic", "vaginal",
)

# Staged column -> the bronze column whose declared words (``coded_values``, ``value_maps``) apply.
TYPE_COLUMNS = {
    "patient": {"gender_source_value": "sex"},
    "encounter": {"visit_source_value": "visit_type"},
    "diagnosis": {"condition_status_source_value": "diagnosis_type"},
    "medication": {"route_source_value": "route"},
    "consent": {"decision": "decision", "purpose": "purpose"},
    "lab_result": {"category": "category"},
}
UNIT_COLUMNS = {"lab_result": {"unit_source_value": "unit"}, "medication": {"dose_unit_source_value": "dose_unit"}}
CODE_COLUMNS = {
    "diagnosis": ("condition_source_value", "condition_source_vocabulary"),
    "lab_result": ("measurement_source_value", "measurement_source_vocabulary"),
    "medication": ("drug_source_value", "drug_source_vocabulary"),
    # A visit's reason is a condition code, checked as diagnoses are.
    "encounter": ("visit_reason_source_value", "visit_reason_source_vocabulary"),
}
CARE_SITE_COLUMN = ("encounter", "care_site_source_value")


@dataclass(frozen=True)
class CodedVocabulary:
    """What one establishment's coded columns may hold, as staged stores them (types lower-cased)."""

    words: dict[str, frozenset[str]]   # staged type column -> accepted values
    units: frozenset[str]              # units accepted in this batch (declared, or UCUM without annotation)
    care_sites: frozenset[str] | None  # lower-cased; None: no declared list, the code pattern applies


def unit_conforms(unit: str, declared: frozenset[str]) -> bool:
    """A unit the configuration declares, or a UCUM expression without annotation."""
    from jobs.terminology.units import parse

    text = unit.strip()
    if text in declared:
        return True
    if not text or len(text) > MAX_UNIT_LENGTH or "{" in text or "}" in text:
        return False
    return parse(text) is not None


def declared_units(consortium: Consortium, establishment_id: str) -> frozenset[str]:
    """Units the configuration vouches for: canonical units, the reference lists', the profile's."""
    units = {t.unit for t in reference.loinc().values()} | {d.dose_unit for d in reference.drugs().values()}
    terminology = consortium.terminology
    if terminology is not None and terminology.units is not None:
        units |= {t.unit for t in terminology.units.tests.values()}
    est = consortium.establishment(establishment_id)
    maps = getattr(est.input, "value_maps", {})
    for column in ("unit", "dose_unit"):
        units |= set(maps.get(column, {}).values()) | set(est.coded_values.get(column, []))
    return frozenset(u.strip() for u in units if u and u.strip())


def declared_vocabulary(consortium: Consortium, establishment_id: str, units: Iterable[str] = ()) -> CodedVocabulary:
    """The vocabulary of one establishment's coded columns; ``units`` are the batch's distinct units,
    of which only the conforming ones are kept (they become literals of the plan, the others never do)."""
    est = consortium.establishment(establishment_id)
    maps = getattr(est.input, "value_maps", {})

    def declared(column: str) -> set[str]:
        return {w.strip().lower() for w in [*maps.get(column, {}).values(), *est.coded_values.get(column, [])]}

    def mapped(domain: str) -> set[str]:
        terminology = consortium.terminology
        if terminology is None:
            return set()
        return {e.code.strip().lower() for e in terminology.entries_for(domain)
                if e.establishment in (None, establishment_id)}

    words = {
        "gender_source_value": set(GENDERS) | mapped("gender") | declared("sex"),
        "visit_source_value": mapped("visit") | declared("visit_type"),
        "condition_status_source_value": set(DIAGNOSIS_TYPES) | declared("diagnosis_type"),
        "route_source_value": set(ROUTES) | {d.route.lower() for d in reference.drugs().values() if d.route}
                              | declared("route"),
        "decision": set(DECISIONS),
        # Purposes are compared as sent (consent.json's purpose.declared does the same).
        "purpose": set(consortium.purposes),
        "category": set(vocabularies.OBSERVATION_CATEGORIES) | declared("category"),
    }
    accepted = declared_units(consortium, establishment_id)
    batch_units = frozenset(u.strip() for u in units if u is not None and unit_conforms(u, accepted))
    sites = None if est.care_sites is None else frozenset(s.strip().lower() for s in est.care_sites)
    return CodedVocabulary({c: frozenset(w) for c, w in words.items()}, batch_units, sites)


def mask(value: Column) -> Column:
    """A fixed mask with the value's kind and length, never the value (``[masked:letters:14]``)."""
    kind = (F.when(value.rlike(r"^[0-9]+$"), F.lit("digits"))
            .when(value.rlike(r"^[\p{L}][\p{L} '.-]*$"), F.lit("letters"))
            .otherwise(F.lit("text")))
    return F.concat(F.lit("[masked:"), kind, F.lit(":"), F.length(value).cast("string"), F.lit("]"))


def _isin(col: Column, values: frozenset[str]) -> Column:
    return col.isin(*sorted(values)) if values else F.lit(False)


def conforms(dataset: str, vocabulary: CodedVocabulary) -> dict[str, Column]:
    """Staged column -> a boolean column, false where a non-null value does not conform (never null)."""
    checks: dict[str, Column] = {}
    for column in TYPE_COLUMNS.get(dataset, {}):
        ok = _isin(F.col(column), vocabulary.words[column])
        if column == "route_source_value":
            ok = ok | F.col(column).rlike(SNOMED_ID)
        checks[column] = ok
    for column in UNIT_COLUMNS.get(dataset, {}):
        checks[column] = _isin(F.col(column), vocabulary.units)
    if dataset in CODE_COLUMNS:
        code, system = (F.col(c) for c in CODE_COLUMNS[dataset])
        known = system.isin(*vocabularies.BY_VOCABULARY)
        checks[CODE_COLUMNS[dataset][0]] = F.when(known, vocabularies.well_formed(system, code)).otherwise(
            code.rlike(UNKNOWN_SYSTEM_CODE))
    if dataset == CARE_SITE_COLUMN[0]:
        site = F.col(CARE_SITE_COLUMN[1])
        checks[CARE_SITE_COLUMN[1]] = (site.rlike(CARE_SITE_CODE) if vocabulary.care_sites is None
                                       else _isin(F.lower(site), vocabulary.care_sites))
    return {c: F.col(c).isNull() | F.coalesce(ok, F.lit(False)) for c, ok in checks.items()}


def guard_coded_fields(staged: DataFrame, dataset: str, vocabulary: CodedVocabulary) -> DataFrame:
    """Mask every coded value that does not conform and name its column in ``_parse_errors``.

    ``staged`` has the staged columns of ``dataset`` (before they are written); the columns and
    their order are kept.
    """
    checks = conforms(dataset, vocabulary)
    if not checks:
        return staged
    flags = [F.when(~ok, F.lit(f"{CODED_ERROR_PREFIX}{column}")) for column, ok in checks.items()]
    errors = F.concat(F.col("_parse_errors"), F.filter(F.array(*flags), lambda e: e.isNotNull()))
    replaced = {column: F.when(ok, F.col(column)).otherwise(mask(F.col(column))) for column, ok in checks.items()}
    replaced["_parse_errors"] = errors
    return staged.select([replaced.get(c, F.col(c)).alias(c) for c in staged.columns])
