"""Only keys generated for the purpose are accepted; nothing is written beyond landing without one."""

import base64
import json
import stat

import pytest

from jobs.privacy.keys import NotAKeyError, WeakKeyError, load_key
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
    ("short-secret", "9 bytes once decoded"),
])
def test_weak_keys_are_refused(value, why):
    with pytest.raises(WeakKeyError, match=why):
        _load(value)


PASSPHRASE = "correct horse battery staple is my secret key!!"


@pytest.mark.parametrize("value, why", [
    (PASSPHRASE, "neither hex nor base64"),
    ("Seven tired otters juggle 42 quiet plums at dawn!", "neither hex nor base64"),
    ("pass word! " * 4, "neither hex nor base64"),
    # Valid base64 (33 bytes) and hex (32 bytes), but a phrase and a number run together, not random bytes.
    ("CorrectHorseBatteryStapleIsMySecretKeyForAll", "only letters"),
    ("4185268399173601428573902846175390248163759012345678901234567890", "only digits"),
])
def test_text_that_is_not_an_encoded_random_key_is_refused_with_the_command_that_makes_one(value, why):
    with pytest.raises(NotAKeyError, match=why) as refused:
        _load(value)
    assert "affluent key generate" in str(refused.value)
    assert value not in str(refused.value)  # the refused secret is never echoed into a log


URLSAFE_32 = base64.urlsafe_b64encode(bytes.fromhex(HEX_32)).decode()


@pytest.mark.parametrize("value", [HEX_32, HEX_32.upper(), B64_32, B64_32.rstrip("="), URLSAFE_32,
                                   URLSAFE_32.rstrip("="), TEST_KEY])
def test_keys_generated_for_the_purpose_are_accepted(value):
    assert _load(value).secret == bytes.fromhex(HEX_32) or value == TEST_KEY


def test_every_source_is_checked(tmp_path, monkeypatch):
    """The key file and the Airflow connection are held to the same rule as the environment."""
    phrase_file = tmp_path / "phrase.key"
    phrase_file.write_text(PASSPHRASE + "\n", encoding="utf-8")
    with pytest.raises(NotAKeyError, match=str(phrase_file)):
        load_key({"AFFLUENT_PSEUDONYM_KEY_FILE": str(phrase_file)}, use_airflow=False)
    raw_file = tmp_path / "raw.key"
    raw_file.write_bytes(bytes(range(200, 240)))  # raw bytes, not text: refused, not a UnicodeDecodeError
    with pytest.raises(NotAKeyError, match="not hex or base64 text"):
        load_key({"AFFLUENT_PSEUDONYM_KEY_FILE": str(raw_file)}, use_airflow=False)
    monkeypatch.setattr("jobs.privacy.keys._from_airflow", lambda: PASSPHRASE)
    with pytest.raises(NotAKeyError, match="Airflow connection affluent_pseudonym_key"):
        load_key({})
    monkeypatch.setattr("jobs.privacy.keys._from_airflow", lambda: HEX_32)
    assert load_key({}).fingerprint == _load(HEX_32).fingerprint


def test_key_generate_writes_an_owner_only_key_file_that_is_accepted_and_never_overwritten(tmp_path, capsys):
    from jobs.app import cli

    path = tmp_path / "secrets" / "affluent.key"
    assert cli.main(["key", "generate", "--out", str(path)]) == 0
    text = path.read_text(encoding="ascii").strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key({"AFFLUENT_PSEUDONYM_KEY_FILE": str(path)}, use_airflow=False)
    assert len(key.secret) == 32 and key.secret == bytes.fromhex(text)
    printed = capsys.readouterr().out
    assert key.fingerprint in printed and text not in printed
    assert cli.main(["key", "generate", "--out", str(path)]) == 1
    assert path.read_text(encoding="ascii").strip() == text
    assert "never overwritten" in capsys.readouterr().err
    other = tmp_path / "other.key"
    assert cli.main(["key", "generate", "--out", str(other)]) == 0
    assert other.read_text(encoding="ascii") != path.read_text(encoding="ascii")


def test_the_demo_key_is_a_generated_key(tmp_path):
    from jobs.app.demo import _demo_key

    path = _demo_key(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(load_key({"AFFLUENT_PSEUDONYM_KEY_FILE": str(path)}, use_airflow=False).secret) == 32


def test_hex_and_base64_of_the_same_bytes_are_the_same_key():
    assert _load(HEX_32).fingerprint == _load(B64_32).fingerprint == _load(f"  {HEX_32}\n").fingerprint


@pytest.mark.parametrize("command", ["run", "ingest"])
def test_the_flow_refuses_to_start_without_a_key(command, tmp_path, monkeypatch, capsys):
    """Without a key, nothing is read from landing into bronze (bronze holds identifiers)."""
    from jobs.app import cli
    from tests.landing_helpers import LAURENTIDES_PATIENT_HEADER, latin1_csv, write_batch

    landing, lake = tmp_path / "landing", tmp_path / "lake"
    write_batch(landing, "chu_laurentides", "20260105-001", {"patients.csv": ("patient", latin1_csv(
        LAURENTIDES_PATIENT_HEADER, ["L1;TREM85521201;Tremblay;Éloïse;12/02/1985;F;1 rue A;Laval;H7N 2B3;;;;A"]))})
    for name in ("AFFLUENT_PSEUDONYM_KEY", "AFFLUENT_PSEUDONYM_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AFFLUENT_LAKE_ROOT", str(lake))
    monkeypatch.setenv("AFFLUENT_LANDING_ROOT", str(landing))
    monkeypatch.setattr("jobs.privacy.keys._from_airflow", lambda: None)
    # A refusal is a clean end of the command: the key error's one line, a non-zero exit, no traceback.
    assert cli.main([command, "--establishment", "chu_laurentides", "--batch", "20260105-001"]) == cli.EXIT_STOPPED
    err = capsys.readouterr().err
    assert "AFFLUENT_PSEUDONYM_KEY" in err, err
    assert "Traceback" not in err
    assert not lake.exists() or not any(lake.rglob("*.parquet")), json.dumps([str(p) for p in lake.rglob("*")])
