"""Concept maps: FHIR R4 ConceptMap resources under ``config/terminology/``, loaded and checked.

Layout::

    config/terminology/*.json                   consortium-wide maps
    config/terminology/<establishment>/*.json   that establishment's overrides (win over the consortium's)
    config/terminology/units.yaml               canonical UCUM unit per LOINC code (jobs.terminology.units)

A ConceptMap serves one *domain*, named by its ``targetUri`` (the value set of
the standard concepts it maps to, :data:`DOMAINS`): ``gender`` and ``visit``
map to OMOP concept ids, ``condition`` to the WHO ICD-10 category (three
characters), ``drug`` to the ATC level-5 substance. Each ``group`` maps one
source code system to the domain's target system; each ``element`` one source
code. An element's target ``equivalence`` (R4 ``ConceptMapEquivalence``) says
whether it gives a standard concept: ``equal``, ``equivalent``, ``wider`` and
``subsumes`` do; ``unmatched`` and ``disjoint`` declare that the source code has
no standard concept on purpose (concept 0, recorded with the map); the others
(``relatedto``, ``narrower``, ``specializes``, ``inexact``) are kept for the
steward to read but give concept 0.

Which map produced a row's concept is recorded on the row as ``<id>|<version>``.
Codes reached by rule rather than by map (an ICD-10-CA/CM code's category, an
ATC level-5 code itself) record the rule's name and version (:data:`RULES`).

Example::

    terminology = load_terminology(Path("config"))
    terminology.entries_for("visit")[0]   # MapEntry(domain='visit', code='amb', concept='9202', ...)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.reference import vocabularies

if TYPE_CHECKING:  # loaded lazily by load_terminology
    from jobs.terminology.units import CanonicalUnits

TERMINOLOGY_DIR = "terminology"
BASE_URI = "https://affluent.example.org/fhir"
# OMOP concept ids as a FHIR code system (as OHDSI's FHIR terminology server names it).
OMOP_URI = "https://fhir-terminology.ohdsi.org"
ADMINISTRATIVE_GENDER_URI = "http://hl7.org/fhir/administrative-gender"
ACT_CODE_URI = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD10_URI = "http://hl7.org/fhir/sid/icd-10"
ATC_URI = "http://www.whocc.no/atc"
# Establishments' own words (CSV exports): any code system under this prefix.
LOCAL_SYSTEM_PREFIX = f"{BASE_URI}/CodeSystem/"

# "No matching concept", OMOP's concept 0.
NO_CONCEPT = "0"

MAPPED_EQUIVALENCES = frozenset({"equal", "equivalent", "wider", "subsumes"})
UNMAPPED_BY_DESIGN = frozenset({"unmatched", "disjoint"})
EQUIVALENCES = MAPPED_EQUIVALENCES | UNMAPPED_BY_DESIGN | {"relatedto", "narrower", "specializes", "inexact"}


@dataclass(frozen=True)
class Domain:
    """One kind of standard concept: which silver columns it reads and writes, what it maps to."""

    name: str
    dataset: str
    source_column: str
    # Silver column holding the source code system (None: the value alone is the source concept).
    vocabulary_column: str | None
    concept_column: str
    map_column: str
    target_system: str
    target_pattern: str
    # Source systems a group may map from: FHIR URIs, or the local prefix for establishments' words.
    source_systems: tuple[str, ...]
    # How source values are compared (silver stores them lower- or upper-cased).
    case: str
    integer_concept: bool

    @property
    def value_set(self) -> str:
        return f"{BASE_URI}/ValueSet/{self.name}"


def _uris(*vocabulary_ids: str) -> tuple[str, ...]:
    return tuple(uri for v in vocabulary_ids for uri in vocabularies.BY_VOCABULARY[v].uris)


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("gender", "patient", "gender_source_value", None, "gender_concept_id", "gender_concept_map",
           OMOP_URI, r"^[0-9]+$", (ADMINISTRATIVE_GENDER_URI, LOCAL_SYSTEM_PREFIX), "lower", True),
    Domain("visit", "encounter", "visit_source_value", None, "visit_concept_id", "visit_concept_map",
           OMOP_URI, r"^[0-9]+$", (ACT_CODE_URI, LOCAL_SYSTEM_PREFIX), "lower", True),
    Domain("condition", "diagnosis", "condition_source_value", "condition_source_vocabulary",
           "condition_concept_code", "condition_concept_map", ICD10_URI, r"^[A-Z][0-9]{2}$",
           _uris(*vocabularies.DIAGNOSIS_VOCABULARIES), "upper", False),
    Domain("drug", "medication", "drug_source_value", "drug_source_vocabulary", "drug_concept_code",
           "drug_concept_map", ATC_URI, r"^[A-Z][0-9]{2}[A-Z]{2}[0-9]{2}$",
           _uris(*vocabularies.DRUG_VOCABULARIES), "upper", False),
)}
DOMAIN_OF_DATASET = {d.dataset: d for d in DOMAINS.values()}
DOMAIN_OF_VALUE_SET = {d.value_set: d for d in DOMAINS.values()}

# Concepts reached by rule, recorded on the row like a map's id and version.
RULE_ICD10_CATEGORY = "rule:icd10-category|1"
RULE_ATC_LEVEL5 = "rule:atc-level5|1"
RULES = {"condition": RULE_ICD10_CATEGORY, "drug": RULE_ATC_LEVEL5}


class TerminologyError(Exception):
    """A concept map is broken; each problem names the file, the entry and the reason."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {f}: {e}: {r}" for f, e, r in problems)
        super().__init__(f"{len(problems)} problem(s) in the concept maps:\n{lines}\n"
                         "Fix the maps under config/terminology/ and run `affluent config check` again.")


@dataclass(frozen=True)
class MapEntry:
    """One source code of one map, with the standard concept it gives (``0`` when none)."""

    domain: str
    # None: consortium-wide; otherwise the establishment the override applies to.
    establishment: str | None
    # Silver's vocabulary id of the source system (None for domains matched on the value alone).
    vocabulary: str | None
    code: str
    concept: str
    equivalence: str
    map_ref: str
    file: str


@dataclass(frozen=True)
class Terminology:
    """Every map entry of the configuration, plus the canonical units (see :mod:`jobs.terminology.units`)."""

    entries: tuple[MapEntry, ...]
    maps: dict[str, str]          # map_ref -> file
    units: CanonicalUnits

    def entries_for(self, domain: str) -> list[MapEntry]:
        return [e for e in self.entries if e.domain == domain]


def normalise(domain: Domain, code: str) -> str:
    code = code.strip()
    return code.lower() if domain.case == "lower" else code.upper()


def _source_vocabulary(domain: Domain, system: str) -> str | None:
    if domain.vocabulary_column is None:
        return None
    found = vocabularies.system_for(system)
    return found.vocabulary if found else None


def _allowed_source(domain: Domain, system: str) -> bool:
    return any(system == s or (s.endswith("/") and system.startswith(s) and len(system) > len(s))
               for s in domain.source_systems)


def _read_map(path: Path, rel: str, establishment: str | None,
              problems: list[tuple[str, str, str]]) -> list[MapEntry]:
    try:
        resource = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append((rel, "-", f"not readable as JSON: {exc}"))
        return []
    if not isinstance(resource, dict) or resource.get("resourceType") != "ConceptMap":
        problems.append((rel, "resourceType", "expected a FHIR R4 ConceptMap resource"))
        return []
    missing = [key for key in ("id", "version", "url") if not isinstance(resource.get(key), str) or not resource[key]]
    for name in missing:
        problems.append((rel, name, f"a ConceptMap needs its {name} (it is recorded on every row it maps)"))
    if missing:
        return []
    domain = DOMAIN_OF_VALUE_SET.get(resource.get("targetUri", ""))
    if domain is None:
        problems.append((rel, "targetUri", f"unknown target value set {resource.get('targetUri')!r}; use one of "
                                           f"{sorted(DOMAIN_OF_VALUE_SET)}"))
        return []
    map_ref = f"{resource['id']}|{resource['version']}"
    entries: list[MapEntry] = []
    seen: dict[tuple[str | None, str], tuple[str, str]] = {}
    for g, group in enumerate(resource.get("group") or []):
        where = f"group[{g}]"
        source, target = group.get("source", ""), group.get("target", "")
        if not _allowed_source(domain, source):
            problems.append((rel, f"{where}.source", f"source system {source!r} cannot map to {domain.name} "
                                                     f"concepts; use one of {list(domain.source_systems)}"))
            continue
        if target != domain.target_system:
            problems.append((rel, f"{where}.target", f"target system {target!r}; {domain.name} concepts are "
                                                     f"{domain.target_system!r}"))
            continue
        vocabulary = _source_vocabulary(domain, source)
        for i, element in enumerate(group.get("element") or []):
            entry = f"{where}.element[{i}]"
            code = element.get("code")
            if not isinstance(code, str) or not code.strip():
                problems.append((rel, entry, "an element needs its source code"))
                continue
            entry = f"{entry} (code {code!r})"
            if vocabulary is not None and not vocabularies.is_well_formed(vocabulary, code.strip()):
                problems.append((rel, entry, f"not a well-formed {vocabulary} code"))
                continue
            targets = element.get("target") or []
            if not targets:
                problems.append((rel, entry, "no target: declare equivalence 'unmatched' to leave it unmapped"))
                continue
            usable = []
            for t, tgt in enumerate(targets):
                eq = tgt.get("equivalence")
                if eq not in EQUIVALENCES:
                    problems.append((rel, f"{entry}.target[{t}]",
                                     f"unknown equivalence {eq!r}; use one of {sorted(EQUIVALENCES)}"))
                    continue
                if eq in MAPPED_EQUIVALENCES:
                    tcode = str(tgt.get("code") or "")
                    if not re.match(domain.target_pattern, tcode):
                        problems.append((rel, f"{entry}.target[{t}]", f"target code {tcode!r} is not a "
                                                                      f"{domain.name} concept of {target}"))
                        continue
                    usable.append((tcode, eq))
            if len({c for c, _ in usable}) > 1:
                problems.append((rel, entry, f"conflicting targets {sorted({c for c, _ in usable})}: a source "
                                             "code gives one standard concept"))
                continue
            concept, eq = usable[0] if usable else (NO_CONCEPT, targets[0].get("equivalence"))
            key = (vocabulary, normalise(domain, code))
            if key in seen:
                earlier, earlier_concept = seen[key]
                kind = "duplicate" if earlier_concept == concept else "conflicting"
                problems.append((rel, entry, f"{kind} entry: {earlier} already maps {key[1]!r}"
                                             + ("" if kind == "duplicate" else f" to {earlier_concept}")))
                continue
            seen[key] = (entry, concept)
            entries.append(MapEntry(domain.name, establishment, vocabulary, key[1], concept, eq, map_ref, rel))
    return entries


def _cross_file_problems(entries: list[MapEntry]) -> list[tuple[str, str, str]]:
    """Two maps of one scope (consortium, or one establishment) giving one source code two concepts."""
    problems = []
    first: dict[tuple, MapEntry] = {}
    for e in entries:
        key = (e.domain, e.establishment, e.vocabulary, e.code)
        other = first.setdefault(key, e)
        if other is not e and other.file != e.file:
            kind = "duplicate" if other.concept == e.concept else "conflicting"
            problems.append((e.file, f"code {e.code!r}", f"{kind} entry: {other.file} already maps it"
                                                         + ("" if kind == "duplicate" else f" to {other.concept}")))
    return problems


def check_terminology(root: Path, establishments: set[str] | None = None) -> tuple[Terminology | None, list]:
    """Load ``root/terminology``; return the terminology (None when broken) and its problems.

    ``establishments``: the known establishment ids; an override folder for another one is a problem.
    """
    from jobs.terminology.units import load_units

    folder = Path(root) / TERMINOLOGY_DIR
    problems: list[tuple[str, str, str]] = []
    entries: list[MapEntry] = []
    files: dict[str, str] = {}
    if folder.is_dir():
        scopes = [(None, folder)] + [(p.name, p) for p in sorted(folder.iterdir()) if p.is_dir()]
        for establishment, where in scopes:
            rel_dir = f"{TERMINOLOGY_DIR}/{establishment}" if establishment else TERMINOLOGY_DIR
            if establishment and establishments is not None and establishment not in establishments:
                problems.append((rel_dir, "-", f"overrides for unknown establishment {establishment!r}"))
                continue
            for path in sorted(where.glob("*.json")):
                rel = f"{rel_dir}/{path.name}"
                found = _read_map(path, rel, establishment, problems)
                for e in found:
                    if files.setdefault(e.map_ref, rel) != rel:
                        problems.append((rel, "id", f"map {e.map_ref} is also declared in {files[e.map_ref]}"))
                        break
                entries += found
    problems += _cross_file_problems(entries)
    units, unit_problems = load_units(folder)
    problems += unit_problems
    if problems:
        return None, problems
    return Terminology(tuple(entries), files, units), []


def load_terminology(root: Path) -> Terminology:
    """The configuration's concept maps and canonical units; :class:`TerminologyError` when one is broken."""
    terminology, problems = check_terminology(root)
    if problems or terminology is None:
        raise TerminologyError(problems)
    return terminology


def default_terminology() -> Terminology:
    """The maps of the configuration folder the settings name (``AFFLUENT_CONFIG_DIR`` or ``config/``)."""
    import os

    from jobs.core.settings import ENV_CONFIG_DIR, PROJECT_ROOT

    return load_terminology(Path(os.environ.get(ENV_CONFIG_DIR, PROJECT_ROOT / "config")))
