"""The pseudonymisation key: read at run time, never stored with the data.

Sources, first found wins:

1. ``AFFLUENT_PSEUDONYM_KEY`` (environment; hex, base64 or raw text),
2. ``AFFLUENT_PSEUDONYM_KEY_FILE`` (a file readable by the pipeline only),
3. the Airflow connection ``affluent_pseudonym_key`` (its password), when the
   job runs inside Airflow.

Hex and base64 keys are decoded before their strength is measured, in bytes
(``openssl rand -hex 16`` gives 32 characters but only 16 bytes). Without a
key, with one shorter than 32 bytes, or with one made of a few repeated byte
values, nothing runs: a missing secret is never replaced by a default.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV_KEY = "AFFLUENT_PSEUDONYM_KEY"
ENV_KEY_FILE = "AFFLUENT_PSEUDONYM_KEY_FILE"
AIRFLOW_CONN_ID = "affluent_pseudonym_key"
MIN_KEY_BYTES = 32
# A repeated short pattern ("aaaa…", "password" * 4) is long but not secret: a
# decoded key needs this many distinct byte values, a text key twice as many characters.
MIN_DISTINCT_BYTES = 8
MIN_DISTINCT_TEXT = 16
_HEX = re.compile(r"[0-9A-Fa-f]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class MissingKeyError(RuntimeError):
    """No usable pseudonymisation key was found."""


class WeakKeyError(RuntimeError):
    """The pseudonymisation key is too short to be safe."""


class KeyMismatchError(RuntimeError):
    """A table was written with another key; mixing pseudonyms would corrupt it."""


@dataclass(frozen=True)
class PseudonymKey:
    """The consortium's secret key and the sub-keys derived from it.

    ``repr`` never shows the secret, so a key cannot leak through logs.
    """

    secret: bytes

    def __repr__(self) -> str:
        return f"PseudonymKey(fingerprint={self.fingerprint})"

    __str__ = __repr__

    @property
    def fingerprint(self) -> str:
        """A public, one-way identifier of the key, stored with the tables."""
        return hashlib.sha256(b"affluent-key-fingerprint:" + self.secret).hexdigest()[:16]

    def derive(self, purpose: str) -> bytes:
        """A sub-key for one use (an establishment's record ids, a project's pseudonyms)."""
        return hmac.new(self.secret, purpose.encode("utf-8"), hashlib.sha256).digest()

    def person_key(self) -> bytes:
        return self.derive("person")

    def establishment_key(self, establishment_id: str) -> bytes:
        return self.derive(f"establishment:{establishment_id}")

    def project_key(self, project_id: str) -> bytes:
        return self.derive(f"project:{project_id}")


def _decode(raw: str) -> tuple[bytes, bool]:
    """The key's bytes: hex and base64 are decoded, so that strength is counted in bytes of entropy.

    ``openssl rand -hex 16`` is 32 characters but 16 bytes; counted as text it
    would pass for a 32-byte key.
    """
    text = raw.strip()
    if _HEX.fullmatch(text) and len(text) % 2 == 0:
        return bytes.fromhex(text), False
    if _BASE64.fullmatch(text) and len(text) % 4 == 0:
        try:
            return base64.b64decode(text, validate=True), False
        except binascii.Error:
            pass
    return text.encode("utf-8"), True


def _check_strength(secret: bytes, is_text: bool, source: str) -> None:
    if len(secret) < MIN_KEY_BYTES:
        raise WeakKeyError(
            f"The pseudonymisation key from {source} is {len(secret)} bytes once decoded (hex and base64 are "
            f"decoded); at least {MIN_KEY_BYTES} are required. Generate one with `openssl rand -hex 32`."
        )
    distinct, needed = len(set(secret)), (MIN_DISTINCT_TEXT if is_text else MIN_DISTINCT_BYTES)
    if distinct < needed:
        raise WeakKeyError(
            f"The pseudonymisation key from {source} uses only {distinct} distinct "
            f"{'characters' if is_text else 'byte values'} (a repeated pattern); at least {needed} are required. "
            "Generate one with `openssl rand -hex 32`."
        )


def _from_airflow() -> str | None:
    try:
        from airflow.sdk import Connection  # only inside an Airflow worker
    except ImportError:
        return None
    try:
        return Connection.get(AIRFLOW_CONN_ID).password
    except Exception:  # noqa: BLE001 - a missing connection means "not configured here"
        return None


def load_key(environ: dict[str, str] | None = None, use_airflow: bool = True) -> PseudonymKey:
    """Read the key from the environment, a file or Airflow; refuse a missing or weak one."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_KEY)
    source = ENV_KEY
    if not raw and env.get(ENV_KEY_FILE):
        path = Path(env[ENV_KEY_FILE])
        if not path.is_file():
            raise MissingKeyError(f"{ENV_KEY_FILE} points to {path}, which does not exist.")
        raw, source = path.read_text(encoding="utf-8"), str(path)
    if not raw and use_airflow:
        raw, source = _from_airflow(), f"Airflow connection {AIRFLOW_CONN_ID}"
    if not raw:
        raise MissingKeyError(
            "No pseudonymisation key. Set AFFLUENT_PSEUDONYM_KEY (at least 32 bytes, e.g. "
            "`export AFFLUENT_PSEUDONYM_KEY=$(openssl rand -hex 32)`), or AFFLUENT_PSEUDONYM_KEY_FILE "
            f"to a file holding it, or the password of the Airflow connection '{AIRFLOW_CONN_ID}'."
        )
    secret, is_text = _decode(raw)
    _check_strength(secret, is_text, source)
    return PseudonymKey(secret)
