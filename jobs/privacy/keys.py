"""The pseudonymisation key: read at run time, never stored with the data.

Sources, first found wins:

1. ``AFFLUENT_PSEUDONYM_KEY`` (environment),
2. ``AFFLUENT_PSEUDONYM_KEY_FILE`` (a file readable by the pipeline only, e.g.
   one written by ``affluent key generate``),
3. the Airflow connection ``affluent_pseudonym_key`` (its password), when the
   job runs inside Airflow.

Whatever the source, the key must be one generated for the purpose: hex or
base64 (standard or URL-safe, padded or not) of at least 32 random bytes.
Text that decodes as neither (a passphrase, however long) is refused: a phrase
someone chose can be guessed, and with it every pseudonym reversed offline by
hashing candidate health-insurance numbers. Once decoded, the key must hold at
least 32 bytes with at least 8 distinct byte values (no repeated short
pattern), and its text must mix letters with digits or symbols (a word run
together, ``CorrectHorseBatteryStapleIsMyKey``, is valid base64 but not
random). Nothing runs without a key that passes: a missing secret is never
replaced by a default.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

ENV_KEY = "AFFLUENT_PSEUDONYM_KEY"
ENV_KEY_FILE = "AFFLUENT_PSEUDONYM_KEY_FILE"
AIRFLOW_CONN_ID = "affluent_pseudonym_key"
MIN_KEY_BYTES = 32
# A repeated short pattern ("00" * 32, "abcd" * 16) is long but not secret: a
# decoded key needs this many distinct byte values.
MIN_DISTINCT_BYTES = 8
GENERATE_COMMAND = "affluent key generate --out <file>"
_HEX = re.compile(r"[0-9A-Fa-f]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_BASE64_URLSAFE = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_LETTER = re.compile(r"[A-Za-z]")
_NOT_LETTER = re.compile(r"[^A-Za-z=]")


class MissingKeyError(RuntimeError):
    """No usable pseudonymisation key was found."""


class WeakKeyError(RuntimeError):
    """The pseudonymisation key is too short to be safe."""


class NotAKeyError(WeakKeyError):
    """The pseudonymisation key is text someone chose (a passphrase), not random bytes encoded."""


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


def _decode(raw: str, source: str) -> bytes:
    """The key's bytes, decoded from hex or base64; text that is neither is refused.

    Strength is counted in decoded bytes: ``openssl rand -hex 16`` is 32
    characters but 16 bytes.
    """
    text = raw.strip()
    if _HEX.fullmatch(text) and len(text) % 2 == 0:
        return bytes.fromhex(text)
    for pattern, altchars in ((_BASE64, None), (_BASE64_URLSAFE, b"-_")):
        if pattern.fullmatch(text) and len(text.rstrip("=")) % 4 != 1:
            padded = text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4)
            try:
                return base64.b64decode(padded, altchars=altchars, validate=True)
            except binascii.Error:
                break
    raise NotAKeyError(
        f"The pseudonymisation key from {source} is neither hex nor base64: it reads as text someone chose "
        "(a passphrase), which can be guessed, and with it every pseudonym reversed. Use a key generated for "
        f"the purpose, at least {MIN_KEY_BYTES} random bytes: `{GENERATE_COMMAND}` writes one to a file "
        f"(or `openssl rand -hex {MIN_KEY_BYTES}`)."
    )


def _check_strength(raw: str, secret: bytes, source: str) -> None:
    how = f"Generate one with `{GENERATE_COMMAND}` (or `openssl rand -hex {MIN_KEY_BYTES}`)."
    if len(secret) < MIN_KEY_BYTES:
        raise WeakKeyError(
            f"The pseudonymisation key from {source} is {len(secret)} bytes once decoded (hex and base64 are "
            f"decoded); at least {MIN_KEY_BYTES} are required. {how}"
        )
    distinct = len(set(secret))
    if distinct < MIN_DISTINCT_BYTES:
        raise WeakKeyError(
            f"The pseudonymisation key from {source} uses only {distinct} distinct byte values (a repeated "
            f"pattern); at least {MIN_DISTINCT_BYTES} are required. {how}"
        )
    # Random hex or base64 of 32 bytes holds only letters, or no letter, about once in 7,700 draws (base64)
    # and never in practice (hex); a phrase run together ("CorrectHorseBattery…") always does.
    text = raw.strip()
    if not _LETTER.search(text) or not _NOT_LETTER.search(text):
        raise NotAKeyError(
            f"The pseudonymisation key from {source} holds only {'letters' if _LETTER.search(text) else 'digits'}: "
            f"words or a number run together, not random bytes encoded (a random key mixes letters with digits "
            f"or symbols). {how}"
        )


def generate_key_file(path: Path) -> PseudonymKey:
    """Write a new random key (hex of 32 bytes) to ``path``, readable by its owner only; never overwrite.

    Example::

        generate_key_file(Path("/run/secrets/affluent"))  # then AFFLUENT_PSEUDONYM_KEY_FILE=/run/secrets/affluent
    """
    if path.exists() or path.is_symlink():
        raise FileExistsError(
            f"{path} already exists; a key is never overwritten (a new key means new pseudonyms for everyone). "
            "Choose another file, or remove this one on purpose first."
        )
    while True:
        text = secrets.token_hex(MIN_KEY_BYTES)
        try:
            _check_strength(text, bytes.fromhex(text), "generated")
            break
        except WeakKeyError:  # a draw of fewer than 8 distinct bytes: vanishingly rare, draw again
            continue
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with owner-only permissions from the start: never a moment where another user may read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(text + "\n")
    return PseudonymKey(bytes.fromhex(text))


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
        try:
            raw, source = path.read_text(encoding="ascii"), str(path)
        except UnicodeDecodeError:
            raise NotAKeyError(
                f"{ENV_KEY_FILE} points to {path}, which is not hex or base64 text (raw bytes or another "
                f"encoding). Write a key file with `{GENERATE_COMMAND}`."
            ) from None
    if not raw and use_airflow:
        raw, source = _from_airflow(), f"Airflow connection {AIRFLOW_CONN_ID}"
    if not raw:
        raise MissingKeyError(
            f"No pseudonymisation key. Set AFFLUENT_PSEUDONYM_KEY_FILE to a key file written by `{GENERATE_COMMAND}`, "
            "or AFFLUENT_PSEUDONYM_KEY to hex or base64 of at least 32 random bytes (e.g. "
            "`export AFFLUENT_PSEUDONYM_KEY=$(openssl rand -hex 32)`), or the password of the Airflow "
            f"connection '{AIRFLOW_CONN_ID}'."
        )
    secret = _decode(raw, source)
    _check_strength(raw, secret, source)
    return PseudonymKey(secret)
