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

# Zones that may hold direct identifiers; nothing else may ever contain one.
RESTRICTED_ZONES = (LANDING, BRONZE)


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
