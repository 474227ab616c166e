"""Zones of the lake and where each table lives.

One root (``lake/`` by default, or ``s3a://bucket/lake``) holds every zone of
DESIGN.md. Paths are built here only, so that the zones stay where the access
rules expect them.
"""

from __future__ import annotations

from dataclasses import dataclass

LANDING = "landing"
BRONZE = "bronze"
STAGED = "staged"
SILVER = "silver"
QUARANTINE = "quarantine"
OPS = "ops"
GOLD = "gold"
PROJECTS = "projects"

VALIDATED = "validated"

# What a zone may hold about a person. Erasure, retention and the privacy
# tests iterate over ZONES, so that no zone can be forgotten.
DIRECT_IDENTIFIERS = "direct_identifiers"    # names, NAM, MRN, addresses, free text
PATIENT_REFERENCES = "patient_references"    # an establishment's patient reference, in clear
PATIENT_KEYS = "patient_keys"                # keyed patient references (``patient_key``)
PERSON_IDS = "person_ids"                    # the consortium pseudonym ``person_id``
PROJECT_PERSON_IDS = "project_person_ids"    # ``person_id`` keyed again per project


@dataclass(frozen=True)
class Zone:
    """A zone of the lake, what it holds about persons, and whether it only holds batches in flight."""

    name: str
    holds: frozenset[str]
    transient: bool = False


ZONES = {z.name: z for z in (
    Zone(LANDING, frozenset({DIRECT_IDENTIFIERS, PATIENT_REFERENCES})),
    Zone(BRONZE, frozenset({DIRECT_IDENTIFIERS, PATIENT_REFERENCES})),
    Zone(STAGED, frozenset({PATIENT_KEYS, PERSON_IDS}), transient=True),
    Zone(VALIDATED, frozenset({PATIENT_KEYS, PERSON_IDS}), transient=True),
    Zone(SILVER, frozenset({PATIENT_KEYS, PERSON_IDS})),
    Zone(QUARANTINE, frozenset({PERSON_IDS})),
    # ops holds erasure requests (patient keys, kept so that a re-delivery can be checked) and counts.
    Zone(OPS, frozenset({PATIENT_KEYS})),
    Zone(GOLD, frozenset()),
    Zone(PROJECTS, frozenset({PROJECT_PERSON_IDS})),
)}

# How a transient zone's tables are laid out: one folder per establishment and batch, so that a batch
# leaves them (land, skip, the retention purge) as whole files, a metadata-only DELETE with no Spark job
# over the rows, and a stage's reads and rewrites of its batch touch its own files only. A
# table made before this layout keeps its own (partitioned by establishment): every operation works on both.
TRANSIENT_PARTITIONS = ("establishment_id", "_batch_id")

# Zones that may hold direct identifiers; nothing else may ever contain one.
RESTRICTED_ZONES = tuple(name for name, zone in ZONES.items() if DIRECT_IDENTIFIERS in zone.holds)


def file_reference(batch_id: str, index: int) -> str:
    """How a delivered file is named in the lake: its batch and its place in the manifest's ``files``, from 0.

    File names can identify (``Given_Family_<uuid>.json``); the name itself
    stays in the batch's ``manifest.json`` in landing.
    """
    return f"{batch_id}#{index}"


@dataclass(frozen=True)
class Lake:
    """The lake's root and the path of every table in it."""

    root: str

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def zone(self, zone: str) -> str:
        return self._join(zone)

    def landing(self, establishment_id: str | None = None, batch_id: str | None = None) -> str:
        parts = [LANDING] + [p for p in (establishment_id, batch_id) if p]
        return self._join(*parts)

    def bronze(self, dataset: str) -> str:
        return self._join(BRONZE, dataset)

    def staged(self, dataset: str) -> str:
        return self._join(STAGED, dataset)

    def validated(self, dataset: str) -> str:
        return self._join(VALIDATED, dataset)

    def silver(self, dataset: str) -> str:
        return self._join(SILVER, dataset)

    def quarantine(self) -> str:
        return self._join(QUARANTINE, "rows")

    def ops(self, table: str) -> str:
        return self._join(OPS, table)

    def gold(self, indicator: str) -> str:
        return self._join(GOLD, indicator)

    def project(self, project_id: str, dataset: str | None = None) -> str:
        parts = [PROJECTS, project_id] + ([dataset] if dataset else [])
        return self._join(*parts)

    def reports(self) -> str:
        return self._join(OPS, "reports")
