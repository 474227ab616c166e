"""The researcher's side: an HTTP client of the gateway (``affluent query/export``, notebooks).

The gateway's URL comes from ``AFFLUENT_GATEWAY_URL`` (default
``http://127.0.0.1:8765``), the token from ``AFFLUENT_TOKEN`` or the profile
file ``~/.affluent/token``. The client holds no key and reads no lake: every
rule is applied by the gateway.

Example::

    client = GatewayClient.from_env()
    result = client.query("diabetes_outcomes", "SELECT count(*) AS n FROM encounter")
    print(result.columns, result.rows)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx

ENV_GATEWAY_URL = "AFFLUENT_GATEWAY_URL"
ENV_TOKEN = "AFFLUENT_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8765"
PROFILE_TOKEN = Path("~/.affluent/token")


class GatewayRefused(Exception):
    """The gateway refused the request (HTTP status and its message)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[list]
    suppressed_cells: int
    notes: list[str]
    audit_event: str
    # Differentially private answers: epsilon, delta and the budget left (None for row-level projects).
    privacy: dict | None = None

    def to_text(self, limit: int = 50) -> str:
        widths = [max([len(str(c))] + [len(str(r[i])) for r in self.rows[:limit]]) for i, c in enumerate(self.columns)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(self.columns, widths))]
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in self.rows[:limit]]
        if len(self.rows) > limit:
            lines.append(f"… {len(self.rows) - limit} more row(s)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Export:
    content: bytes
    rows: int
    suppressed_cells: int
    audit_event: str


def token_from_env() -> str:
    token = os.environ.get(ENV_TOKEN)
    if token:
        return token.strip()
    profile = PROFILE_TOKEN.expanduser()
    if profile.is_file():
        return profile.read_text(encoding="utf-8").strip()
    raise GatewayRefused(401, f"no token: set {ENV_TOKEN} or write the token a steward gave you to {PROFILE_TOKEN}")


class GatewayClient:
    def __init__(self, url: str, token: str, timeout: float = 120.0, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {token}"})

    @classmethod
    def from_env(cls) -> "GatewayClient":
        return cls(os.environ.get(ENV_GATEWAY_URL, DEFAULT_URL), token_from_env())

    def _post(self, path: str, body: dict) -> httpx.Response:
        response = self._http.post(path, json=body)
        if response.status_code != 200:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise GatewayRefused(response.status_code, message)
        return response

    def query(self, project: str, sql: str) -> QueryResult:
        data = self._post(f"/v1/projects/{project}/query", {"sql": sql}).json()
        return QueryResult(columns=data["columns"], rows=data["rows"], suppressed_cells=data["suppressed_cells"],
                           notes=data["notes"], audit_event=data["audit_event"], privacy=data.get("privacy"))

    def export(self, project: str, sql: str, fmt: str = "csv") -> Export:
        response = self._post(f"/v1/projects/{project}/export", {"sql": sql, "format": fmt})
        return Export(content=response.content, rows=int(response.headers["x-affluent-rows"]),
                      suppressed_cells=int(response.headers["x-affluent-suppressed-cells"]),
                      audit_event=response.headers["x-affluent-audit-event"])

    def close(self) -> None:
        self._http.close()
