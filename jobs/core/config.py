"""The consortium's declarations under ``config/``, loaded into typed models.

Every file is validated on load: a problem is reported with the file, the key
and the reason, and nothing runs on a configuration that has one (fail closed).

Layout::

    config/
      pipeline.yaml              retention, k, batch-level thresholds
      purposes.yaml              purposes and their consent regime
      agreements.yaml            establishment x datasets x purposes
      establishments/<id>.yaml   one file per establishment (its input profile)
      projects/<id>.yaml         one file per research project
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.core.schemas import BRONZE_COLUMNS, DATASETS, PERSON_IDENTIFIERS, RECORD_REF, SILVER_SCHEMAS

if TYPE_CHECKING:  # for annotations only: the terminology layer sits above the core
    from jobs.terminology.maps import Terminology

REGIME_OPT_IN = "opt_in"
REGIME_OPT_OUT = "opt_out"
CANONICAL_ACTIONS = ("upsert", "delete")
CANONICAL_DECISIONS = ("permit", "deny", "withdraw")
DATE_PRECISIONS = ("day", "month", "year", "shifted")
SUPPORTED_ENCODINGS = ("utf-8", "utf-8-sig", "latin-1", "iso-8859-1", "cp1252", "windows-1252")


class ConfigError(Exception):
    """The configuration has problems; each names the file, the key and the reason."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the configuration:\n{lines}\n"
                         "Fix them and run `affluent config check` again.")


@dataclass(frozen=True)
class Problem:
    file: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The ``files`` entry (CSV) and manifest dataset of files the consortium does not collect (a Synthea
# export's claims.csv, a Bulk export's Procedure.ndjson): checked and counted, never read beyond the header.
NOT_COLLECTED = "not_collected"


# Observation.category codes whose results are observations, not lab measurements, unless a profile
# lists its own (``observations.categories``).
OBSERVATION_CATEGORIES = ("social-history", "survey")


class ObservationRouting(_Strict):
    """Which results are observations (silver ``observation``) rather than LOINC measurements
    (``lab_result``), and the closed list of word answers an observation may keep as text.

    A result is an observation when its code is listed under ``codes``, its category under
    ``categories``, or (FHIR) its code has no LOINC coding; in a CSV file of ``lab_result`` also when
    its value is one of the ``answers``. Anything else stays a lab result. A word answer lands
    (``value_as_string``) only when it is one of ``answers``: any other text may be free text
    and is dropped (counted in the batch log), the rest of the row landing.
    """

    # Codes (``code``, or ``system|code`` with the system as the export writes it) of observations.
    codes: list[str] = []
    # Category codes of observations (FHIR Observation.category; in CSV, the column mapped to
    # ``category`` under ``columns.observation``).
    categories: list[str] = list(OBSERVATION_CATEGORIES)
    # The closed list of word answers ("Never smoker", "Yes"); matched ignoring case and surrounding
    # blanks, landed as written here.
    answers: list[str] = []

    @field_validator("answers")
    @classmethod
    def _distinct_answers(cls, value: list[str]) -> list[str]:
        folded = [a.strip().lower() for a in value]
        if any(not a for a in folded):
            raise ValueError("an answer cannot be blank")
        dupes = sorted({a for a in folded if folded.count(a) > 1})
        if dupes:
            raise ValueError(f"answers listed twice (case and blanks aside): {dupes}")
        return value

    def answer_lookup(self) -> dict[str, str]:
        """Folded answer (lower case, trimmed) → the answer as the profile writes it."""
        return {a.strip().lower(): a.strip() for a in self.answers}


class CsvProfile(_Strict):
    """How one establishment writes its CSV extracts."""

    format: Literal["csv"]
    delimiter: str = Field(min_length=1, max_length=1)
    quote: str = Field(default='"', min_length=1, max_length=1)
    encoding: str
    date_format: str
    datetime_format: str
    decimal_separator: Literal[".", ","] = "."
    action_values: dict[str, str] = {}
    # dataset -> {source header -> canonical column}
    columns: dict[str, dict[str, str]]
    # canonical column -> {source value -> canonical value}
    value_maps: dict[str, dict[str, str]] = {}
    # Longest field accepted, in bytes; overrides the consortium's max_field_bytes (config/pipeline.yaml).
    max_field_bytes: int | None = Field(default=None, ge=1, le=8 << 20)
    # The action of every record of a file with no action column (a snapshot export): with a
    # manifest of kind ``full``, records absent from the snapshot are deleted at land.
    default_action: Literal["upsert"] | None = None
    # dataset -> source headers whose values, joined, are the record id of a file that has none
    # (keyed like any other id; two different records with one derived id are quarantined).
    derived_ids: dict[str, list[str]] = {}
    # Datasets of ``derived_ids`` whose rows may share a derived id and still be distinct records (two
    # oxygen saturations of one patient in the same second): each id gets a sequence number within
    # the rows sharing it, in the order of their content, so both land. Identical rows share one number
    # (and stay exact duplicates).
    derived_id_sequence: list[str] = []
    # dataset -> {canonical column -> value} for columns the export does not carry
    # (the code system of a file whose codes are all SNOMED CT).
    constants: dict[str, dict[str, str]] = {}
    # dataset -> source headers present in the export and deliberately not read.
    ignored_columns: dict[str, list[str]] = {}
    # dataset -> file-name patterns (``conditions*.csv``): the dataset of a manifest entry that
    # does not name one. ``not_collected`` lists the files the consortium does not collect: their
    # rows are counted (batch log ``rows_not_collected``, per file) and never read beyond the header.
    files: dict[str, list[str]] = {}
    # person-identifier system (``person_identifiers`` in pipeline.yaml) -> the patient file's
    # source header carrying it; the NAM may instead be mapped to ``nam`` under ``columns``.
    person_identifiers: dict[str, str] = {}
    # Rows of a lab_result file that are observations (codes, categories, word answers), read with
    # the mapping under ``columns.observation``; the closed list of word answers.
    observations: ObservationRouting = ObservationRouting()

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        if value.lower() not in SUPPORTED_ENCODINGS:
            raise ValueError(f"unsupported encoding {value!r}; use one of {', '.join(SUPPORTED_ENCODINGS)}")
        return value.lower()

    @field_validator("action_values")
    @classmethod
    def _known_actions(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(v for v in value.values() if v not in CANONICAL_ACTIONS)
        if bad:
            raise ValueError(f"actions must be one of {CANONICAL_ACTIONS}, not {bad}")
        return value

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for dataset, mapping in value.items():
            if dataset not in DATASETS:
                raise ValueError(f"unknown dataset {dataset!r}; datasets are {', '.join(DATASETS)}")
            # person_identifiers is built from input.person_identifiers, never mapped from one header.
            unknown = sorted(set(mapping.values()) - (set(BRONZE_COLUMNS[dataset]) - {PERSON_IDENTIFIERS}))
            if unknown:
                raise ValueError(f"{dataset}: unknown canonical column(s) {unknown}; "
                                 f"expected some of {', '.join(BRONZE_COLUMNS[dataset])}")
            targets = list(mapping.values())
            dupes = sorted({t for t in targets if targets.count(t) > 1})
            if dupes:
                raise ValueError(f"{dataset}: several headers map to {dupes}")
        return value

    def problems(self) -> list[tuple[str, str]]:
        """``(key under input, reason)`` for every per-dataset section that cannot work.

        Checked by :func:`load_consortium` (not as a model validator) so each
        problem is reported under its own key.
        """
        problems: list[tuple[str, str]] = []
        for section in ("derived_ids", "constants", "ignored_columns", "files"):
            for dataset in getattr(self, section):
                if section == "files" and dataset == NOT_COLLECTED:
                    continue
                if dataset not in self.columns:
                    problems.append((f"{section}.{dataset}", "the dataset has no mapping under columns"))
        for dataset in self.derived_id_sequence:
            if dataset not in self.derived_ids:
                problems.append((f"derived_id_sequence.{dataset}", "a sequence numbers derived ids: list the "
                                 f"headers the record id is built from under derived_ids.{dataset}"))
        for dataset, headers in self.derived_ids.items():
            if not headers:
                problems.append((f"derived_ids.{dataset}", "list the source headers the record id is built from"))
            ref = RECORD_REF.get(dataset)
            if ref in self.columns.get(dataset, {}).values():
                problems.append((f"derived_ids.{dataset}", f"a header already maps to {ref}; keep one of the two"))
        for dataset, constants in self.constants.items():
            mapped = set(self.columns.get(dataset, {}).values())
            for column in constants:
                if column not in BRONZE_COLUMNS.get(dataset, ()):
                    problems.append((f"constants.{dataset}.{column}", "unknown canonical column"))
                elif column in mapped:
                    problems.append((f"constants.{dataset}.{column}", "a header already maps to it"))
                elif column in ("record_action", RECORD_REF.get(dataset), "patient_ref"):
                    problems.append((f"constants.{dataset}.{column}", "an id or the action cannot be a constant"))
        for dataset, headers in self.ignored_columns.items():
            both = sorted(set(headers) & set(self.columns.get(dataset, {})))
            if both:
                problems.append((f"ignored_columns.{dataset}", f"{both} are also mapped under columns"))
        for dataset, mapping in self.columns.items():
            sources = set(mapping.values()) | set(self.constants.get(dataset, {}))
            if dataset in self.derived_ids:
                sources.add(RECORD_REF[dataset])
            if self.default_action:
                sources.add("record_action")
            for column in required_columns(dataset):
                if column not in sources:
                    hint = {"record_action": "or set default_action: upsert for snapshot files",
                            RECORD_REF[dataset]: f"or build it from other columns under derived_ids.{dataset}"}
                    problems.append((f"columns.{dataset}", f"no source for the required column {column}: map a "
                                     f"header to it {hint.get(column, '')}".rstrip()))
        routing = self.observations
        if (routing.codes or routing.answers) and "observation" not in self.columns:
            problems.append(("observations", "observations are read with the mapping under columns.observation: "
                             "map the observation file's headers there (observation_code, value, observed_at…)"))
        if self.routes_observations():
            for header in sorted(set(self.columns["observation"]) & set(self.ignored_columns.get("lab_result", []))):
                problems.append(("ignored_columns.lab_result", f"{header!r} is mapped under columns.observation, "
                                 "which reads the observations of lab_result files"))
        for system, header in self.person_identifiers.items():
            if "patient" not in self.columns:
                problems.append((f"person_identifiers.{system}", "the profile has no patient mapping"))
            elif header in self.columns["patient"]:
                problems.append((f"person_identifiers.{system}", f"header {header!r} is also mapped under "
                                 "columns.patient"))
        return problems

    def routes_observations(self) -> bool:
        """Whether the rows of lab_result files are routed between lab_result and observation: both
        datasets are mapped under ``columns``."""
        return "lab_result" in self.columns and "observation" in self.columns

    def expected_headers(self, dataset: str) -> list[str]:
        """The source headers a file of ``dataset`` should have, in the profile's order."""
        headers = list(self.columns[dataset]) + list(self.derived_ids.get(dataset, []))
        if dataset == "lab_result" and self.routes_observations():
            # Its observation rows are read with the observation mapping (a CATEGORY column, say).
            headers += list(self.columns["observation"]) + list(self.derived_ids.get("observation", []))
        headers += self.ignored_columns.get(dataset, [])
        if dataset == "patient":
            headers += list(self.person_identifiers.values())
        return list(dict.fromkeys(headers))


def required_columns(dataset: str) -> tuple[str, ...]:
    """Canonical columns a dataset's rows cannot do without: the record id, the patient's (facts), the action."""
    patient = () if dataset == "patient" else ("patient_ref",)
    return (RECORD_REF[dataset], *patient, "record_action")


class FhirProfile(_Strict):
    """How one establishment sends FHIR R4 (Bulk NDJSON and Bundles)."""

    format: Literal["fhir"]
    # Patient.identifier systems (URIs) that carry the Québec health-insurance number (the ``nam`` system).
    nam_systems: list[str] = []
    # person-identifier system (``person_identifiers`` in pipeline.yaml) -> Patient.identifier system URIs.
    identifier_systems: dict[str, list[str]] = {}
    purpose_codes: dict[str, str] = {}
    # Which Observations are observations rather than lab results, and the closed list of word answers.
    observations: ObservationRouting = ObservationRouting()


class PersonIdentifierSystem(_Strict):
    """A person identifier the consortium links establishments' patients by (``person_identifiers``)."""

    id: str = Field(pattern=r"^[a-z][a-z0-9_]{1,40}$")
    description: str = ""
    # Before the check: ``upper_alnum`` keeps letters and digits, upper-cased (``trem 8552-1512``
    # → ``TREM85521512``); ``digits`` keeps digits; ``trim`` only strips surrounding blanks.
    normalise: Literal["upper_alnum", "digits", "trim"] = "upper_alnum"
    # The normalised value must match this (a Python and Java regular expression).
    pattern: str | None = None
    # ``nam``: the Québec NAM (shape, a real birth date agreeing with the patient's birth date and
    # sex); ``luhn``: the last digit is a Luhn (mod 10) check digit; ``none``: the pattern only.
    check: Literal["none", "nam", "luhn"] = "none"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            import re

            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


# Bronze columns that hold a type or a unit, for which an establishment may declare its own words
# (``coded_values``) beside the shared vocabulary.
DECLARABLE_COLUMNS = ("sex", "visit_type", "diagnosis_type", "route", "unit", "dose_unit")


class Establishment(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{1,40}$")
    name: str
    landing_folder: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    input: CsvProfile | FhirProfile = Field(discriminator="format")
    # Thresholds of this establishment's batches, over the consortium's (e.g. while onboarding).
    batch_rules: EstablishmentBatchRules | None = None
    # Batches are validated and reported but held before land until a steward accepts the profile
    # (`affluent onboarding accept`, jobs.stages.onboarding).
    onboarding: bool = False
    # The care sites (units, services) this establishment's encounters may name. A value outside
    # the list is masked before staging and its row quarantined (conformance.coded_field): a care-site
    # field can hold a name or an address. Without a list, a care site must be a short unit code
    # with a digit (jobs.privacy.coded_fields.CARE_SITE_CODE).
    care_sites: list[str] | None = None
    # Canonical type or unit column -> words this establishment may send there besides the shared
    # vocabulary (concept maps, UCUM, reference lists); see jobs.privacy.coded_fields.
    coded_values: dict[str, list[str]] = {}

    @field_validator("care_sites")
    @classmethod
    def _care_sites_listed(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not v.strip() for v in value)):
            raise ValueError("list the care sites' names (an empty list would reject every encounter's "
                             "care site; leave the key out to accept short unit codes only)")
        return value

    @field_validator("coded_values")
    @classmethod
    def _coded_columns(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(value) - set(DECLARABLE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown coded column(s) {unknown}; declare words for {', '.join(DECLARABLE_COLUMNS)}")
        return value


class Purpose(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{1,40}$")
    description: str = ""
    regime: Literal["opt_in", "opt_out"]


class Agreement(_Strict):
    establishment: str
    datasets: list[str] = Field(min_length=1)
    purposes: list[str] = Field(min_length=1)


class RelinkRisk(_Strict):
    """A bound on re-link risk through code sets (k^m-anonymity, :mod:`jobs.privacy.relink`); a field left out keeps
    the consortium's (``relink_risk`` in ``pipeline.yaml``)."""

    # No person shared by fewer than k persons on demographics plus any m codes, nor re-linked to
    # fewer than k persons of another active extract.
    k: int | None = Field(default=None, ge=2)
    m: int | None = Field(default=None, ge=1, le=3)
    # Share of the extract's (person, code) items that may be suppressed to meet the bound.
    max_suppressed: float | None = Field(default=None, ge=0, le=1)


class RelinkRiskDefaults(RelinkRisk):
    k: int = Field(default=5, ge=2)
    m: int = Field(default=2, ge=1, le=3)
    max_suppressed: float = Field(default=1.0, ge=0, le=1)


class PrivacyBudget(_Strict):
    """Differential privacy of an aggregate-only project's answers (computed by OpenDP).

    Every answer spends ``epsilon_per_query`` (and ``delta_per_query`` when
    its group keys are chosen by DP partition selection) of the member's
    ``epsilon`` / ``delta`` for the current ``period``, and of the project's
    ``project_epsilon`` when one is set; a query that would go over is refused.
    A person adds at most ``max_rows_per_person`` rows to a query (more are
    dropped at random before counting), so one person moves a count by at most
    that much before noise. Group keys are the values listed in
    ``public_keys`` (never read from the data) or, for the columns listed in
    ``partition_selection``, those that pass OpenDP's noisy threshold. Sums
    and means read only columns with ``bounds``; values are clipped to them.
    """

    epsilon: float = Field(default=1.0, gt=0, le=20)
    delta: float = Field(default=1e-6, ge=0, le=1e-3)
    period: Literal["day", "month", "year", "project"] = "month"
    project_epsilon: float | None = Field(default=None, gt=0)
    epsilon_per_query: float = Field(default=0.1, gt=0, le=5)
    delta_per_query: float = Field(default=1e-8, ge=0, le=1e-4)
    max_rows_per_person: int = Field(default=10, ge=1, le=1000)
    public_keys: dict[str, list[str | int | float]] = {}
    partition_selection: list[str] = []
    bounds: dict[str, tuple[float, float]] = {}

    @field_validator("public_keys", mode="before")
    @classmethod
    def _ranges(cls, value):
        # ``year_of_birth: {from: 1920, to: 2026}`` stands for every year in between.
        if isinstance(value, dict):
            return {k: list(range(int(v["from"]), int(v["to"]) + 1)) if isinstance(v, dict) else v
                    for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _coherent(self) -> "PrivacyBudget":
        if self.epsilon_per_query > self.epsilon:
            raise ValueError(f"epsilon_per_query {self.epsilon_per_query} is above the budget epsilon {self.epsilon}")
        for column, (low, high) in self.bounds.items():
            if not low < high:
                raise ValueError(f"bounds of {column}: {low} is not below {high}")
        return self


class Project(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{1,40}$")
    title: str
    purpose: str
    ethics_approval: str = Field(min_length=3)
    valid_from: dt.date
    valid_until: dt.date
    members: list[str] = Field(min_length=1)
    establishments: list[str] = Field(min_length=1)
    date_precision: Literal["day", "month", "year", "shifted"] = "month"
    min_cell_size: int = Field(default=11, ge=11)
    datasets: dict[str, list[str]] = Field(min_length=1)
    revoked: bool = False
    # Output checking at the researcher gateway: row-level results (a row per
    # record) only where the data-use agreement allows them; otherwise every
    # result must be an aggregate whose cells pass the checks.
    row_level: bool = False
    # Counts leaving the gateway are rounded to this base (1 = exact), a
    # defence against differencing on top of small-cell suppression.
    count_rounding: int = Field(default=5, ge=1, le=100)
    # The patient extract is k-anonymous on these demographic quasi-identifiers
    # (columns of ``patient``; those the project does not take are ignored).
    k_anonymity: int = Field(default=5, ge=2)
    quasi_identifiers: list[str] = ["year_of_birth", "gender_source_value", "postal_prefix"]
    # Diagnosis and drug code sets are quasi-identifiers too: the bound their extract meets.
    relink_risk: RelinkRisk = RelinkRisk()
    # Aggregate-only projects answer with differentially private statistics under this budget.
    privacy: PrivacyBudget = PrivacyBudget()

    @field_validator("quasi_identifiers")
    @classmethod
    def _patient_columns(cls, value: list[str]) -> list[str]:
        problems = quasi_identifier_problems(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _dates_in_order(self) -> "Project":
        if self.valid_until < self.valid_from:
            raise ValueError(f"valid_until {self.valid_until} is before valid_from {self.valid_from}")
        return self

    def is_active(self, on: dt.date) -> bool:
        return not self.revoked and self.valid_from <= on <= self.valid_until


def is_record_identifier(column: str) -> bool:
    """Whether ``column`` holds a pseudonym (``person_id``) or a record id: joined on, never released.

    Standard concepts (``*_concept_id``, public OMOP vocabularies) and ``establishment_id``
    name no person or record.
    """
    return column == "person_id" or (column.endswith("_id") and column != "establishment_id"
                                     and not column.endswith("_concept_id"))


def quasi_identifier_problems(columns: list[str]) -> list[str]:
    """Why ``columns`` cannot be a project's quasi-identifiers (none: they can)."""
    allowed = [c for c in SILVER_SCHEMAS["patient"].fieldNames()
               if c not in ("person_id", "patient_key", "person_id_source", "establishment_id")
               and not c.startswith("_")]
    problems = [f"quasi-identifier {c!r} is not a demographic column of patient; use some of {allowed}"
                for c in columns if c not in allowed]
    problems += [f"quasi-identifier {c!r} is declared twice" for c in sorted(set(columns)) if columns.count(c) > 1]
    return problems


class BatchRuleOverride(_Strict):
    """Batch-level thresholds that replace the ones above them; a field left out keeps theirs."""

    max_row_count_drop_pct: float | None = Field(default=None, ge=0, le=100)
    max_quarantined_pct: float | None = Field(default=None, ge=0, le=100)
    allow_column_changes: bool | None = None
    min_mapped_pct: float | None = Field(default=None, ge=0, le=100)


class _PerDataset(_Strict):
    """Overrides for single datasets, under ``datasets:``; only the project's datasets are accepted."""

    datasets: dict[str, BatchRuleOverride] = {}

    @field_validator("datasets")
    @classmethod
    def _datasets_known(cls, datasets: dict) -> dict:
        unknown = sorted(set(datasets) - set(DATASETS))
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; use some of {list(DATASETS)}")
        return datasets


class EstablishmentBatchRules(BatchRuleOverride, _PerDataset):
    """An establishment's own thresholds (``batch_rules:`` in its file), and per dataset under ``datasets:``."""


class BatchRules(_PerDataset):
    """The consortium's thresholds (``pipeline.yaml``), per dataset under ``datasets:``.

    The rules that apply to one dataset of one establishment's batch are, from
    the last that sets a field: these, the consortium's ``datasets.<dataset>``,
    the establishment's ``batch_rules``, the establishment's
    ``batch_rules.datasets.<dataset>`` (:meth:`Consortium.batch_rules`).
    """

    max_row_count_drop_pct: float = Field(default=50, ge=0, le=100)
    max_quarantined_pct: float = Field(default=20, ge=0, le=100)
    allow_column_changes: bool = False
    # Share of a dataset's rows with a source value that must map to a standard concept (jobs.terminology).
    min_mapped_pct: float = Field(default=0, ge=0, le=100)


class Pipeline(_Strict):
    bronze_retention_days: int = Field(default=90, ge=0)
    # A batch stopped before land keeps its staged and validated rows this long after its last
    # batch-log entry; a retry re-runs it from bronze, so this is at most the bronze retention.
    transient_retention_days: int = Field(default=14, ge=0)
    postal_prefix_min_persons: int = Field(default=5, ge=1)
    batch_rules: BatchRules = BatchRules()
    # Linkage: the person identifiers a consortium person_id is derived from, in priority order.
    # The first valid one a patient record carries gives its person_id, so the same identifier
    # gives the same person_id whichever establishment sends it.
    person_identifiers: list[PersonIdentifierSystem] = Field(
        default=[PersonIdentifierSystem(id="nam", check="nam")], min_length=1)
    # A CSV field longer than this (bytes) quarantines its record; a profile may override it.
    # At most 8 MiB: records over 16 MiB are never parsed (jobs.readers.csv.RECORD_HARD_LIMIT_BYTES).
    max_field_bytes: int = Field(default=1 << 20, ge=1, le=8 << 20)
    # The consortium's bound on re-link risk through code sets; a project's relink_risk overrides it.
    relink_risk: RelinkRiskDefaults = RelinkRiskDefaults()
    # Counts under this many are suppressed where stewards see row counts of source values (coverage).
    min_cell_size: int = Field(default=11, ge=1)

    @field_validator("person_identifiers")
    @classmethod
    def _systems_once(cls, value: list[PersonIdentifierSystem]) -> list[PersonIdentifierSystem]:
        ids = [s.id for s in value]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"person-identifier system(s) {dupes} declared twice")
        return value

    @model_validator(mode="after")
    def _transient_within_bronze(self) -> "Pipeline":
        if self.transient_retention_days > self.bronze_retention_days:
            raise ValueError(f"transient_retention_days ({self.transient_retention_days}) exceeds "
                             f"bronze_retention_days ({self.bronze_retention_days}): a stopped batch is retried "
                             "from bronze, so its staged rows may not outlive it")
        return self


@dataclass(frozen=True)
class Consortium:
    """Everything declared under ``config/``, validated."""

    root: Path
    pipeline: Pipeline
    establishments: dict[str, Establishment]
    purposes: dict[str, Purpose]
    agreements: list[Agreement]
    projects: dict[str, Project]
    policy_version: str = field(default="")
    # Concept maps and canonical units (config/terminology/), checked with the rest.
    terminology: Terminology | None = field(default=None, compare=False)

    def establishment(self, establishment_id: str) -> Establishment:
        try:
            return self.establishments[establishment_id]
        except KeyError:
            raise ConfigError([Problem("establishments/", establishment_id, "unknown establishment")]) from None

    def batch_rules(self, establishment_id: str, dataset: str) -> BatchRules:
        """The batch-level rules for one dataset of one establishment's batches, overrides applied."""
        base = self.pipeline.batch_rules
        est = self.establishments.get(establishment_id)
        layers = [base.datasets.get(dataset)]
        if est is not None and est.batch_rules is not None:
            layers += [est.batch_rules, est.batch_rules.datasets.get(dataset)]
        values = base.model_dump(exclude={"datasets"})
        for layer in layers:
            if layer is not None:
                values.update({k: v for k, v in layer.model_dump(exclude={"datasets"}).items() if v is not None})
        return BatchRules(**values)

    def agreement_for(self, establishment_id: str) -> Agreement | None:
        return next((a for a in self.agreements if a.establishment == establishment_id), None)


def _read_yaml(path: Path, root: Path, problems: list[Problem]) -> object | None:
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        problems.append(Problem(rel, "-", "file is missing"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "-"
        problems.append(Problem(rel, where, f"not valid YAML: {getattr(exc, 'problem', exc)}"))
    return None


def _validated(model: type[BaseModel], data: object, rel: str, prefix: str, problems: list[Problem]):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            parts = [str(part) for part in err["loc"] if not str(part).startswith("function-")]
            # A profile's errors carry its format tag (input.csv.columns): keys are written without it.
            if parts[:2] in (["input", "csv"], ["input", "fhir"]):
                del parts[1]
            loc = ".".join(parts)
            key = ".".join(p for p in (prefix, loc) if p) or "-"
            problems.append(Problem(rel, key, err["msg"].removeprefix("Value error, ")))
        return None


def _policy_version(root: Path) -> str:
    """A hash of every policy file, recorded with each published extract."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.yaml")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load_consortium(root: Path | str) -> Consortium:
    """Load and validate every file under ``root``; raise :class:`ConfigError` on any problem."""
    root = Path(root)
    problems: list[Problem] = []
    if not root.is_dir():
        raise ConfigError([Problem(str(root), "-", "configuration folder does not exist")])

    pipeline = Pipeline()
    data = _read_yaml(root / "pipeline.yaml", root, problems) if (root / "pipeline.yaml").exists() else {}
    if data is not None:
        pipeline = _validated(Pipeline, data or {}, "pipeline.yaml", "", problems) or pipeline

    purposes: dict[str, Purpose] = {}
    data = _read_yaml(root / "purposes.yaml", root, problems)
    if isinstance(data, dict):
        for i, item in enumerate(data.get("purposes") or []):
            purpose = _validated(Purpose, item, "purposes.yaml", f"purposes[{i}]", problems)
            if purpose:
                if purpose.id in purposes:
                    problems.append(Problem("purposes.yaml", f"purposes[{i}].id", f"duplicate purpose {purpose.id!r}"))
                purposes[purpose.id] = purpose
        if not data.get("purposes"):
            problems.append(Problem("purposes.yaml", "purposes", "no purpose declared"))
    elif data is not None:
        problems.append(Problem("purposes.yaml", "-", "expected a mapping with key 'purposes'"))

    establishments: dict[str, Establishment] = {}
    for path in sorted((root / "establishments").glob("*.yaml")):
        rel = str(path.relative_to(root))
        data = _read_yaml(path, root, problems)
        if data is None:
            continue
        est = _validated(Establishment, data, rel, "", problems)
        if est is None:
            continue
        if est.id != path.stem:
            problems.append(Problem(rel, "id", f"id {est.id!r} differs from the file name {path.stem!r}"))
        if est.id in establishments:
            problems.append(Problem(rel, "id", f"duplicate establishment {est.id!r}"))
        systems = [s.id for s in pipeline.person_identifiers]
        declared = (est.input.identifier_systems if isinstance(est.input, FhirProfile)
                    else est.input.person_identifiers)
        section = "identifier_systems" if isinstance(est.input, FhirProfile) else "person_identifiers"
        for system in declared:
            if system not in systems:
                problems.append(Problem(rel, f"input.{section}.{system}",
                                        f"unknown person-identifier system; pipeline.yaml declares {systems}"))
        if isinstance(est.input, FhirProfile) and est.input.nam_systems and "nam" not in systems:
            problems.append(Problem(rel, "input.nam_systems",
                                    "pipeline.yaml's person_identifiers has no 'nam' system"))
        if (isinstance(est.input, CsvProfile) and "nam" in est.input.columns.get("patient", {}).values()
                and "nam" not in systems):
            problems.append(Problem(rel, "input.columns.patient",
                                    "a header maps to nam but pipeline.yaml's person_identifiers has no 'nam' system"))
        if isinstance(est.input, CsvProfile):
            for dataset, mapping in est.input.columns.items():
                if "record_action" in mapping.values() and not est.input.action_values:
                    problems.append(Problem(rel, "input.action_values",
                                            f"columns.{dataset} maps an action column but no action value is declared"))
        if isinstance(est.input, FhirProfile):
            for code, purpose in est.input.purpose_codes.items():
                if purpose not in purposes:
                    problems.append(Problem(rel, f"input.purpose_codes.{code}", f"unknown purpose {purpose!r}"))
        else:
            problems += [Problem(rel, f"input.{key}", reason) for key, reason in est.input.problems()]
            for column in est.input.value_maps:
                if not any(column in BRONZE_COLUMNS[d] for d in DATASETS):
                    problems.append(Problem(rel, f"input.value_maps.{column}", "unknown canonical column"))
            for value in est.input.value_maps.get("decision", {}).values():
                if value not in CANONICAL_DECISIONS:
                    problems.append(Problem(rel, "input.value_maps.decision",
                                            f"decision {value!r} must be one of {CANONICAL_DECISIONS}"))
        establishments[est.id] = est
    if not establishments:
        problems.append(Problem("establishments/", "-", "no establishment declared"))

    agreements: list[Agreement] = []
    data = _read_yaml(root / "agreements.yaml", root, problems)
    if isinstance(data, dict):
        for i, item in enumerate(data.get("agreements") or []):
            agreement = _validated(Agreement, item, "agreements.yaml", f"agreements[{i}]", problems)
            if agreement is None:
                continue
            key = f"agreements[{i}]"
            if agreement.establishment not in establishments:
                problems.append(Problem("agreements.yaml", f"{key}.establishment",
                                        f"unknown establishment {agreement.establishment!r}"))
            for d in agreement.datasets:
                if d not in DATASETS:
                    problems.append(Problem("agreements.yaml", f"{key}.datasets", f"unknown dataset {d!r}"))
            for p in agreement.purposes:
                if p not in purposes:
                    problems.append(Problem("agreements.yaml", f"{key}.purposes", f"unknown purpose {p!r}"))
            agreements.append(agreement)
    elif data is not None:
        problems.append(Problem("agreements.yaml", "-", "expected a mapping with key 'agreements'"))

    projects: dict[str, Project] = {}
    for path in sorted((root / "projects").glob("*.yaml")):
        rel = str(path.relative_to(root))
        data = _read_yaml(path, root, problems)
        if data is None:
            continue
        project = _validated(Project, data, rel, "", problems)
        if project is None:
            continue
        if project.id != path.stem:
            problems.append(Problem(rel, "id", f"id {project.id!r} differs from the file name {path.stem!r}"))
        if project.purpose not in purposes:
            problems.append(Problem(rel, "purpose", f"unknown purpose {project.purpose!r}"))
        for est_id in project.establishments:
            if est_id not in establishments:
                problems.append(Problem(rel, "establishments", f"unknown establishment {est_id!r}"))
        for dataset, columns in project.datasets.items():
            if dataset not in DATASETS:
                problems.append(Problem(rel, f"datasets.{dataset}", f"unknown dataset {dataset!r}"))
                continue
            known = set(SILVER_SCHEMAS[dataset].fieldNames())
            for column in columns:
                if column not in known or column.startswith("_"):
                    problems.append(Problem(rel, f"datasets.{dataset}", f"unknown column {column!r}"))
            if "person_id" not in columns:
                problems.append(Problem(rel, f"datasets.{dataset}",
                                        "person_id is required: consent is applied per person"))
        projects[project.id] = project

    from jobs.terminology.maps import check_terminology

    terminology, map_problems = check_terminology(root, set(establishments))
    problems += [Problem(file, entry, reason) for file, entry, reason in map_problems]

    if problems:
        raise ConfigError(problems)
    return Consortium(root=root, pipeline=pipeline, establishments=establishments, purposes=purposes,
                      agreements=agreements, projects=projects, policy_version=_policy_version(root),
                      terminology=terminology)
