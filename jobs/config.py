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
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.schemas import BRONZE_COLUMNS, DATASETS, SILVER_SCHEMAS

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


class CsvProfile(_Strict):
    """How one establishment writes its CSV extracts."""

    format: Literal["csv"]
    delimiter: str = Field(min_length=1, max_length=1)
    quote: str = Field(default='"', min_length=1, max_length=1)
    encoding: str
    date_format: str
    datetime_format: str
    decimal_separator: Literal[".", ","] = "."
    action_values: dict[str, str]
    # dataset -> {source header -> canonical column}
    columns: dict[str, dict[str, str]]
    # canonical column -> {source value -> canonical value}
    value_maps: dict[str, dict[str, str]] = {}
    # Longest field accepted, in bytes; overrides the consortium's max_field_bytes (config/pipeline.yaml).
    max_field_bytes: int | None = Field(default=None, ge=1, le=8 << 20)

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
            unknown = sorted(set(mapping.values()) - set(BRONZE_COLUMNS[dataset]))
            if unknown:
                raise ValueError(f"{dataset}: unknown canonical column(s) {unknown}; "
                                 f"expected some of {', '.join(BRONZE_COLUMNS[dataset])}")
            targets = list(mapping.values())
            dupes = sorted({t for t in targets if targets.count(t) > 1})
            if dupes:
                raise ValueError(f"{dataset}: several headers map to {dupes}")
        return value


class FhirProfile(_Strict):
    """How one establishment sends FHIR R4 (Bulk NDJSON and Bundles)."""

    format: Literal["fhir"]
    nam_systems: list[str] = Field(min_length=1)
    purpose_codes: dict[str, str] = {}


class Establishment(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{1,40}$")
    name: str
    landing_folder: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    input: CsvProfile | FhirProfile = Field(discriminator="format")
    # Thresholds of this establishment's batches, over the consortium's (e.g. while onboarding).
    batch_rules: EstablishmentBatchRules | None = None
    # Batches are validated and reported but held before land until a steward accepts the profile
    # (`affluent onboarding accept`, jobs.onboarding).
    onboarding: bool = False


class Purpose(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{1,40}$")
    description: str = ""
    regime: Literal["opt_in", "opt_out"]


class Agreement(_Strict):
    establishment: str
    datasets: list[str] = Field(min_length=1)
    purposes: list[str] = Field(min_length=1)


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


class Pipeline(_Strict):
    bronze_retention_days: int = Field(default=90, ge=0)
    # A batch stopped before land keeps its staged and validated rows this long after its last
    # batch-log entry; a retry re-runs it from bronze, so this is at most the bronze retention.
    transient_retention_days: int = Field(default=14, ge=0)
    postal_prefix_min_persons: int = Field(default=5, ge=1)
    batch_rules: BatchRules = BatchRules()
    # A CSV field longer than this (bytes) quarantines its record; a profile may override it.
    # At most 8 MiB: records over 16 MiB are never parsed (jobs.readers.csv.RECORD_HARD_LIMIT_BYTES).
    max_field_bytes: int = Field(default=1 << 20, ge=1, le=8 << 20)

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
            loc = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-"))
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
        if isinstance(est.input, FhirProfile):
            for code, purpose in est.input.purpose_codes.items():
                if purpose not in purposes:
                    problems.append(Problem(rel, f"input.purpose_codes.{code}", f"unknown purpose {purpose!r}"))
        else:
            for dataset, mapping in est.input.columns.items():
                if "record_action" not in mapping.values():
                    problems.append(Problem(rel, f"input.columns.{dataset}", "no header maps to record_action"))
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

    if problems:
        raise ConfigError(problems)
    return Consortium(root=root, pipeline=pipeline, establishments=establishments, purposes=purposes,
                      agreements=agreements, projects=projects, policy_version=_policy_version(root))
