"""Policy checks used at publish and query time, beyond what loading the configuration checks.

:func:`jobs.core.config.load_consortium` validates each file. Publishing checks
again, just before it runs, that the policy it holds is still coherent and is
still the one under version control: a policy edited after it was loaded, or
assembled in code with a hole in it, stops publishing (fail closed).
"""

from __future__ import annotations

import datetime as dt

from jobs.core.config import (
    Consortium,
    ConfigError,
    Problem,
    Project,
    is_record_identifier,
    load_consortium,
    quasi_identifier_problems,
)
from jobs.core.schemas import DATASETS, SILVER_SCHEMAS


class PolicyError(Exception):
    """The policy cannot be applied as it stands; nothing is published or read."""


class AccessDenied(PolicyError):
    """A researcher may not read this project (not a member, project inactive or unknown)."""


def policy_problems(consortium: Consortium) -> list[Problem]:
    """Every incoherence between projects, purposes, agreements and establishments."""
    problems: list[Problem] = []
    for agreement in consortium.agreements:
        where = f"agreements[{agreement.establishment}]"
        if agreement.establishment not in consortium.establishments:
            problems.append(Problem("agreements.yaml", where, "unknown establishment"))
        problems += [Problem("agreements.yaml", where, f"unknown dataset {d!r}")
                     for d in agreement.datasets if d not in DATASETS]
        problems += [Problem("agreements.yaml", where, f"unknown purpose {p!r}")
                     for p in agreement.purposes if p not in consortium.purposes]
    for project in consortium.projects.values():
        rel = f"projects/{project.id}.yaml"
        if project.purpose not in consortium.purposes:
            problems.append(Problem(rel, "purpose", f"unknown purpose {project.purpose!r}"))
        if project.valid_until < project.valid_from:
            problems.append(Problem(rel, "valid_until", "before valid_from"))
        if project.min_cell_size < 11:
            problems.append(Problem(rel, "min_cell_size", "must be at least 11"))
        if project.k_anonymity < 2:
            problems.append(Problem(rel, "k_anonymity", "must be at least 2"))
        if project.count_rounding < 1:
            problems.append(Problem(rel, "count_rounding", "must be at least 1"))
        problems += [Problem(rel, "quasi_identifiers", reason)
                     for reason in quasi_identifier_problems(project.quasi_identifiers)]
        problems += [Problem(rel, "establishments", f"unknown establishment {e!r}")
                     for e in project.establishments if e not in consortium.establishments]
        for dataset, columns in project.datasets.items():
            if dataset not in DATASETS:
                problems.append(Problem(rel, f"datasets.{dataset}", "unknown dataset"))
                continue
            known = set(SILVER_SCHEMAS[dataset].fieldNames())
            problems += [Problem(rel, f"datasets.{dataset}", f"unknown column {c!r}")
                         for c in columns if c not in known or c.startswith("_")]
            if "person_id" not in columns:
                problems.append(Problem(rel, f"datasets.{dataset}", "person_id is required"))
        # Differential privacy: keys and bounded columns are columns the project reads, never an identifier.
        privacy = project.privacy
        readable = {c for columns in project.datasets.values() for c in columns}
        for field, names in (("public_keys", list(privacy.public_keys)),
                             ("partition_selection", privacy.partition_selection), ("bounds", list(privacy.bounds))):
            problems += [Problem(rel, f"privacy.{field}", f"{c!r} is not a column of the project's datasets")
                         for c in names if c not in readable]
            problems += [Problem(rel, f"privacy.{field}", f"{c!r} is an identifier; it can never be released")
                         for c in names if is_record_identifier(c)]
    return problems


def check_policy(consortium: Consortium) -> None:
    """Raise unless the policy is coherent and still the one on disk.

    Raises :class:`jobs.core.config.ConfigError` for an invalid policy (in memory
    or on disk) and :class:`PolicyError` when the files changed since loading.
    """
    problems = policy_problems(consortium)
    if problems:
        raise ConfigError(problems)
    if consortium.root.is_dir():
        on_disk = load_consortium(consortium.root)  # raises ConfigError on an invalid file
        if on_disk.policy_version != consortium.policy_version:
            raise PolicyError(
                f"The policy under {consortium.root} changed since it was loaded (version "
                f"{consortium.policy_version!r}, now {on_disk.policy_version!r}); reload it and run again.")
    elif not consortium.policy_version:
        raise PolicyError("The policy has no version; load it with jobs.core.config.load_consortium.")


def shared_establishments(consortium: Consortium, project: Project, dataset: str) -> list[str]:
    """Establishments of ``project`` whose sharing agreement covers ``dataset`` for its purpose."""
    allowed = []
    for est_id in project.establishments:
        agreement = consortium.agreement_for(est_id)
        if agreement and dataset in agreement.datasets and project.purpose in agreement.purposes:
            allowed.append(est_id)
    return sorted(allowed)


def establishments_sharing(consortium: Consortium, datasets: tuple[str, ...], purpose: str) -> list[str]:
    """Every establishment whose agreement covers all of ``datasets`` for ``purpose``."""
    return sorted(
        a.establishment for a in consortium.agreements
        if purpose in a.purposes and all(d in a.datasets for d in datasets)
    )


def check_access(consortium: Consortium, project_id: str, user: str, on_date: dt.date) -> Project:
    """The project if ``user`` is a member and it is active on ``on_date``; :class:`AccessDenied` otherwise."""
    project = consortium.projects.get(project_id)
    if project is None:
        raise AccessDenied(f"unknown project {project_id!r}")
    if user not in project.members:
        raise AccessDenied(f"{user!r} is not a member of project {project_id!r}")
    if project.revoked:
        raise AccessDenied(f"project {project_id!r} is revoked")
    if not project.is_active(on_date):
        raise AccessDenied(f"project {project_id!r} is not valid on {on_date} "
                           f"(valid {project.valid_from} to {project.valid_until})")
    return project
