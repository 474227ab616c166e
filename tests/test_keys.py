"""Key strength is counted in decoded bytes; nothing is written beyond landing without a good key."""

import base64
import json

import pytest

from jobs.keys import WeakKeyError, load_key
from tests.conftest import TEST_KEY

HEX_16 = "9f2c4b7a1e83d6f05a4c2e9b7d1f3a68"  # `openssl rand -hex 16`: 32 characters, 16 bytes
HEX_32 = "9f2c4b7a1e83d6f05a4c2e9b7d1f3a6847e1c0d9b3a2f5e86d4c1b0a9e8f7d6c"
B64_32 = base64.b64encode(bytes.fromhex(HEX_32)).decode()
B64_16 = base64.b64encode(bytes.fromhex(HEX_16)).decode()


def _load(value: str):
    return load_key({"AFFLUENT_PSEUDONYM_KEY": value}, use_airflow=False)


@pytest.mark.parametrize("value, why", [
    (HEX_16, "16 bytes once decoded"),
    (B64_16, "16 bytes once decoded"),
    ("00" * 32, "1 distinct byte"),
    ("ab" * 40, "1 distinct byte"),
    ("pass word! " * 4, "distinct characters"),
    ("a short passphrase", "bytes once decoded"),
])
def test_weak_keys_are_refused(value, why):
    with pytest.raises(WeakKeyError, match=why):
        _load(value)


@pytest.mark.parametrize("value", [HEX_32, HEX_32.upper(), B64_32, TEST_KEY,
                                   "Seven tired otters juggle 42 quiet plums at dawn!"])
def test_strong_keys_are_accepted(value):
    assert _load(value).secret


def test_hex_and_base64_of_the_same_bytes_are_the_same_key():
    assert _load(HEX_32).fingerprint == _load(B64_32).fingerprint == _load(f"  {HEX_32}\n").fingerprint


@pytest.mark.parametrize("command", ["run", "ingest"])
def test_the_flow_refuses_to_start_without_a_key(command, tmp_path, monkeypatch, capsys):
    """Without a key, nothing is read from landing into bronze (bronze holds identifiers)."""
    from jobs import cli
    from jobs.keys import MissingKeyError
    from tests.landing_helpers import LAURENTIDES_PATIENT_HEADER, latin1_csv, write_batch

    landing, lake = tmp_path / "landing", tmp_path / "lake"
    write_batch(landing, "chu_laurentides", "20260105-001", {"patients.csv": ("patient", latin1_csv(
        LAURENTIDES_PATIENT_HEADER, ["L1;TREM85521201;Tremblay;Éloïse;12/02/1985;F;1 rue A;Laval;H7N 2B3;;;;A"]))})
    for name in ("AFFLUENT_PSEUDONYM_KEY", "AFFLUENT_PSEUDONYM_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AFFLUENT_LAKE_ROOT", str(lake))
    monkeypatch.setenv("AFFLUENT_LANDING_ROOT", str(landing))
    monkeypatch.setattr("jobs.keys._from_airflow", lambda: None)
    with pytest.raises(MissingKeyError):
        cli.main([command, "--establishment", "chu_laurentides", "--batch", "20260105-001"])
    assert not lake.exists() or not any(lake.rglob("*.parquet")), json.dumps([str(p) for p in lake.rglob("*")])
