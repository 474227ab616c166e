"""Researchers' bearer tokens: one per member and project, issued and revoked by a steward.

A token reads ``aff_<token_id>_<secret>``: ``token_id`` is public (it names
the token in listings and in the audit), ``secret`` is 32 random bytes,
URL-safe base64. Only the SHA-256 of the secret is stored, never the token
itself, so the store can be read by the gateway without handing out access.

The store is a JSON-lines file (``<lake>/access/tokens.jsonl`` for a local
lake, or ``AFFLUENT_TOKEN_STORE``): one ``issue`` or ``revoke`` event per
line, appended by the steward's CLI and only read by the gateway. A revoked
token stays revoked even if its ``issue`` line is copied again.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

ENV_TOKEN_STORE = "AFFLUENT_TOKEN_STORE"
TOKEN_PREFIX = "aff"
EVENT_ISSUE = "issue"
EVENT_REVOKE = "revoke"
_TOKEN_RE = re.compile(r"^aff_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


class TokenError(Exception):
    """The token is unknown, malformed, revoked or expired (HTTP 401)."""


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    project_id: str
    user: str
    secret_sha256: str
    issued_at: str
    expires: dt.date | None
    revoked_at: str | None = None

    def state(self, on: dt.date) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires is not None and on > self.expires:
            return "expired"
        return "active"


def default_store_path(lake_root: str) -> Path:
    """Where the token store lives: ``AFFLUENT_TOKEN_STORE``, else ``<lake>/access/tokens.jsonl``."""
    if os.environ.get(ENV_TOKEN_STORE):
        return Path(os.environ[ENV_TOKEN_STORE])
    if "://" in lake_root:
        raise ValueError(f"the lake is at {lake_root}: set {ENV_TOKEN_STORE} to a local file for the token store "
                         "(a volume the steward writes and the gateway reads)")
    return Path(lake_root) / "access" / "tokens.jsonl"


def _sha256(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


class TokenStore:
    """The append-only token events at ``path``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def _append(self, event: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(json.dumps(event, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def records(self) -> dict[str, TokenRecord]:
        """Every token ever issued, by id, with its revocation if any."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return {}
        issued: dict[str, TokenRecord] = {}
        revoked: dict[str, str] = {}
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            if event["event"] == EVENT_ISSUE and event["token_id"] not in issued:
                expires = event.get("expires")
                issued[event["token_id"]] = TokenRecord(
                    token_id=event["token_id"], project_id=event["project_id"], user=event["user"],
                    secret_sha256=event["secret_sha256"], issued_at=event["issued_at"],
                    expires=dt.date.fromisoformat(expires) if expires else None)
            elif event["event"] == EVENT_REVOKE:
                revoked.setdefault(event["token_id"], event["revoked_at"])
        return {tid: (TokenRecord(**{**r.__dict__, "revoked_at": revoked[tid]}) if tid in revoked else r)
                for tid, r in issued.items()}

    def issue(self, project_id: str, user: str, expires: dt.date | None = None) -> tuple[str, TokenRecord]:
        """A new token for ``user`` on ``project_id``: the token text (shown once) and its record."""
        token_id = secrets.token_hex(8)
        secret = secrets.token_bytes(32)
        text = f"{TOKEN_PREFIX}_{token_id}_{base64.urlsafe_b64encode(secret).decode().rstrip('=')}"
        record = TokenRecord(token_id=token_id, project_id=project_id, user=user, secret_sha256=_sha256(secret),
                             issued_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                             expires=expires)
        self._append({"event": EVENT_ISSUE, "token_id": token_id, "project_id": project_id, "user": user,
                      "secret_sha256": record.secret_sha256, "issued_at": record.issued_at,
                      "expires": expires.isoformat() if expires else None})
        return text, record

    def revoke(self, token_id: str) -> TokenRecord:
        record = self.records().get(token_id)
        if record is None:
            raise TokenError(f"no token {token_id!r} in {self.path}")
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self._append({"event": EVENT_REVOKE, "token_id": token_id, "revoked_at": now})
        return TokenRecord(**{**record.__dict__, "revoked_at": now})

    def authenticate(self, token: str, on: dt.date) -> TokenRecord:
        """The record of an active token; :class:`TokenError` for anything else."""
        match = _TOKEN_RE.match(token or "")
        if match is None:
            raise TokenError("malformed or missing bearer token")
        token_id, encoded = match.groups()
        try:
            secret = base64.urlsafe_b64decode(encoded + "=")
        except ValueError:
            raise TokenError("malformed bearer token") from None
        record = self.records().get(token_id)
        if record is None or not hmac.compare_digest(record.secret_sha256, _sha256(secret)):
            raise TokenError("unknown token")
        state = record.state(on)
        if state != "active":
            raise TokenError(f"token {token_id} is {state}")
        return record


def token_id_of(token: str) -> str | None:
    """The public id inside a token text, for the audit of a refused request (None if malformed)."""
    match = _TOKEN_RE.match(token or "")
    return match.group(1) if match else None
