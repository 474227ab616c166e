"""Standard code systems: their names, FHIR URIs and what a well-formed code of each looks like.

The one place that knows the code systems. A code is valid when it is well
formed for its system (pattern, and check digit where the system has one);
the reference lists beside this module only add display names and
plausibility bounds (see :mod:`jobs.reference`). Every validator exists twice,
in Python (:func:`is_well_formed`, for reference lists and tests) and as a
Spark column (:func:`well_formed`, for validation); the tests hold them to
the same answers on real codes.

- LOINC: ``^\\d{1,7}-\\d$``, the digit after the hyphen is the mod-10 check
  digit of the part before it (LOINC's algorithm is Luhn's).
- SNOMED CT: 6 to 18 digits, Verhoeff check digit last, and a partition
  identifier (the two digits before it) of a concept: ``00`` (international
  short format) or ``10`` (extension long format).
- ICD-10 and its national modifications (ICD-10-CA, ICD-10-CM, CIM-10): a
  letter, two characters of which the first is a digit, then up to four
  characters after an optional dot (``E11.9``, ``E1152``, ``S52.521A``).
- RxNorm: an RxCUI, 1 to 8 digits.
- ATC: ``A10BA02`` and its shorter levels (``A``, ``A10``, ``A10B``, ``A10BA``).
- DIN (Health Canada): 8 digits.

Example::

    from jobs.reference.vocabularies import is_well_formed, system_for

    is_well_formed("LOINC", "718-7")               # True
    is_well_formed("LOINC", "718-6")               # False: check digit
    system_for("http://snomed.info/sct").vocabulary  # 'SNOMED'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyspark.sql import Column
from pyspark.sql import functions as F

CHECK_MOD10 = "mod10"
CHECK_VERHOEFF = "verhoeff"

_ICD10 = r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$"


@dataclass(frozen=True)
class CodeSystem:
    """One standard code system."""

    # Stored beside the code in silver (``*_source_vocabulary``), OMOP ``vocabulary_id`` habit.
    vocabulary: str
    # As CSV extracts and the FHIR reader name it (``condition_system``, ``drug_system``).
    name: str
    # Other spellings establishments write; compared upper-case without punctuation.
    aliases: tuple[str, ...]
    # FHIR ``Coding.system`` URIs; the first is the one Affluent writes.
    uris: tuple[str, ...]
    pattern: str
    check: str | None = None


SYSTEMS: tuple[CodeSystem, ...] = (
    CodeSystem("LOINC", "LOINC", (), ("http://loinc.org",), r"^[0-9]{1,7}-[0-9]$", CHECK_MOD10),
    CodeSystem("SNOMED", "SNOMED", ("SNOMED CT", "SCT"), ("http://snomed.info/sct",),
               r"^[1-9][0-9]{5,17}$", CHECK_VERHOEFF),
    CodeSystem("ICD10CA", "ICD-10-CA", ("CIM-10-CA",),
               ("https://fhir.infoway-inforoute.ca/CodeSystem/icd10ca", "http://hl7.org/fhir/sid/icd-10-ca"), _ICD10),
    CodeSystem("ICD10CM", "ICD-10-CM", ("CIM-10-CM",), ("http://hl7.org/fhir/sid/icd-10-cm",), _ICD10),
    CodeSystem("ICD10", "ICD-10", ("CIM-10", "CIM10"), ("http://hl7.org/fhir/sid/icd-10",), _ICD10),
    CodeSystem("RxNorm", "RxNorm", (), ("http://www.nlm.nih.gov/research/umls/rxnorm",), r"^[0-9]{1,8}$"),
    CodeSystem("ATC", "ATC", (), ("http://www.whocc.no/atc",), r"^[A-Z]([0-9]{2}([A-Z]([A-Z]([0-9]{2})?)?)?)?$"),
    CodeSystem("DIN", "DIN", (), ("http://hl7.org/fhir/NamingSystem/ca-hc-din",
                                  "https://health-products.canada.ca/dpd-bdpp"), r"^[0-9]{8}$"),
)
BY_VOCABULARY = {s.vocabulary: s for s in SYSTEMS}

# Which systems each coded dataset accepts.
DIAGNOSIS_VOCABULARIES = ("ICD10CA", "ICD10", "ICD10CM", "SNOMED")
LAB_VOCABULARIES = ("LOINC",)
DRUG_VOCABULARIES = ("ATC", "DIN", "RxNorm")
# FHIR R4 observation-category codes (http://terminology.hl7.org/CodeSystem/observation-category), which
# Synthea's CSV CATEGORY also uses; a profile's value_maps.category maps an establishment's own words.
OBSERVATION_CATEGORIES = ("social-history", "vital-signs", "imaging", "laboratory", "procedure", "survey",
                          "exam", "therapy", "activity")

UCUM_URI = "http://unitsofmeasure.org"


def token(text: str) -> str:
    """A system name or URI compared the way :func:`vocabulary_of` compares it."""
    return re.sub(r"[^A-Za-z0-9]", "", text).upper()


def _tokens() -> dict[str, str]:
    found: dict[str, str] = {}
    for system in SYSTEMS:
        for spelling in (system.vocabulary, system.name, *system.aliases, *system.uris):
            found.setdefault(token(spelling), system.vocabulary)
    return found


# Every spelling (upper case, letters and digits only) → vocabulary id.
VOCABULARY_TOKENS = _tokens()
# FHIR URI → the name the CSV extracts use.
NAMES_BY_FHIR_URI = {uri: s.name for s in SYSTEMS for uri in s.uris}


def system_for(spelling: str) -> CodeSystem | None:
    """The system a name, alias, vocabulary id or FHIR URI designates (``None`` if unknown)."""
    vocabulary = VOCABULARY_TOKENS.get(token(spelling or ""))
    return BY_VOCABULARY.get(vocabulary) if vocabulary else None


def vocabulary_of(col: Column) -> Column:
    """Spark: the vocabulary id of a source system column; the trimmed source text when unknown."""
    key = F.upper(F.regexp_replace(col, r"[^A-Za-z0-9]", ""))
    lookup = F.create_map(*[F.lit(x) for pair in VOCABULARY_TOKENS.items() for x in pair])
    return F.coalesce(lookup[key], F.nullif(F.trim(col), F.lit("")))


# ------------------------------------------------------------ Python ----

_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)
SNOMED_CONCEPT_PARTITIONS = ("00", "10")


def verhoeff_ok(digits: str) -> bool:
    """Whether the last digit of ``digits`` is its Verhoeff check digit."""
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _VERHOEFF_D[c][_VERHOEFF_P[i % 8][int(ch)]]
    return c == 0


def mod10_check_digit(digits: str) -> int:
    """LOINC's mod-10 check digit of ``digits`` (Luhn: double every other digit from the right)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return (10 - total % 10) % 10


def is_well_formed(vocabulary: str, code: str) -> bool:
    """Whether ``code`` is a well-formed code of ``vocabulary`` (an id, name, alias or URI)."""
    system = system_for(vocabulary)
    if system is None or code is None or not re.match(system.pattern, code):
        return False
    if system.check == CHECK_MOD10:
        body, check = code.split("-")
        return mod10_check_digit(body) == int(check)
    if system.check == CHECK_VERHOEFF:
        return code[-3:-1] in SNOMED_CONCEPT_PARTITIONS and verhoeff_ok(code)
    return True


# ------------------------------------------------------------- Spark ----

def _digits_from_right(text: Column) -> Column:
    return F.transform(F.split(F.reverse(text), ""), lambda ch: ch.cast("int"))


def _mod10_ok(code: Column) -> Column:
    body, check = F.substring_index(code, "-", 1), F.substring_index(code, "-", -1).cast("int")

    def weighted(d: Column, i: Column) -> Column:
        doubled = d * 2
        return F.when(i % 2 == 0, F.when(doubled > 9, doubled - 9).otherwise(doubled)).otherwise(d)

    total = F.aggregate(F.transform(_digits_from_right(body), weighted), F.lit(0), lambda acc, d: acc + d)
    return (10 - total % 10) % 10 == check


def luhn_ok(digits: Column) -> Column:
    """Whether a string of digits ends in its Luhn (mod 10) check digit, as card and many MPI numbers do."""
    def weighted(d: Column, i: Column) -> Column:
        doubled = d * 2
        return F.when(i % 2 == 1, F.when(doubled > 9, doubled - 9).otherwise(doubled)).otherwise(d)

    total = F.aggregate(F.transform(_digits_from_right(digits), weighted), F.lit(0), lambda acc, d: acc + d)
    return F.coalesce(digits.rlike(r"^[0-9]{2,}$") & (total % 10 == 0), F.lit(False))


def _int_table(rows) -> Column:
    """A table of small integers as one array-of-arrays literal: one expression parsed, not a call per cell
    (an in-process session pays a JVM round trip for each ``F.lit``, 180 of them for Verhoeff's tables)."""
    return F.expr("array(" + ", ".join("array(" + ", ".join(str(int(x)) for x in row) + ")" for row in rows) + ")")


def _verhoeff_ok(code: Column) -> Column:
    d_table = _int_table(_VERHOEFF_D)
    p_table = _int_table(_VERHOEFF_P)
    steps = F.transform(_digits_from_right(code), lambda d, i: F.struct(i.alias("i"), d.alias("d")))

    def step(c: Column, s: Column) -> Column:
        permuted = F.element_at(F.element_at(p_table, s["i"] % 8 + 1), s["d"] + 1)
        return F.element_at(F.element_at(d_table, c + 1), permuted + 1)

    return F.aggregate(steps, F.lit(0), step) == 0


def well_formed(vocabulary: Column, code: Column) -> Column:
    """Spark: true where ``code`` is well formed for ``vocabulary`` (a vocabulary id); null when either
    is null or the vocabulary is not a standard system (another rule names that)."""
    result = None
    for system in SYSTEMS:
        ok = code.rlike(system.pattern)
        if system.check == CHECK_MOD10:
            ok = ok & F.when(ok, _mod10_ok(code))
        elif system.check == CHECK_VERHOEFF:
            partition = F.substring(code, -3, 2)
            ok = ok & partition.isin(*SNOMED_CONCEPT_PARTITIONS) & F.when(ok, _verhoeff_ok(code))
        ok = F.coalesce(ok, F.lit(False))
        result = (F.when(vocabulary == system.vocabulary, ok) if result is None
                  else result.when(vocabulary == system.vocabulary, ok))
    return F.when(code.isNotNull(), result)
