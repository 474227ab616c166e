"""The Spark service: one warm Spark Connect server, reached with a token, holding the key.

The suite's one service (``tests/conftest.py``, started as ``affluent spark
start`` starts it, stopped when the suite ends). The client session here is a real Spark Connect client:
no JVM of its own, every request captured on its way out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_KEY
from tests.privacy_helpers import (
    BATCH,
    EST,
    PATIENT_FILE,
    encodings,
    hmac_hex,
    write_planted_batch,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def connect(service):
    """A Spark Connect client session of the service, whose requests are all recorded (``.requests``)."""
    from jobs.core.session import ENV_REMOTE, ENV_TOKEN, get_spark, is_connect

    os.environ[ENV_REMOTE], os.environ[ENV_TOKEN] = service.address, service.token
    spark = get_spark()
    assert is_connect(spark)
    recorder = _Recorder(spark._client._stub)
    spark._client._stub = recorder
    spark.requests = recorder.requests
    yield spark
    from jobs.core.spark_service import _listening

    if _listening(service.port):
        spark.stop()
    else:  # a failed restart test left no service: releasing the session would wait minutes for it
        spark._client._channel.close()
    for name in (ENV_REMOTE, ENV_TOKEN, "SPARK_CONNECT_MODE_ENABLED"):  # the rest of the suite runs classic
        os.environ.pop(name, None)


class _Recorder:
    """Wraps the client's gRPC stub: every request's bytes are kept before it leaves."""

    def __init__(self, stub):
        self._stub = stub
        self.requests: list[bytes] = []

    def __getattr__(self, name):
        real = getattr(self._stub, name)

        def call(request, *args, **kwargs):
            self.requests.append(request.SerializeToString())
            return real(request, *args, **kwargs)
        return call


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.app.cli", *args], capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


def _key():
    from jobs.privacy.keys import load_key

    return load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)


def test_inside_airflow_the_address_comes_from_the_spark_connect_connection(monkeypatch):
    from jobs.core.session import ENV_REMOTE, public_address, remote_url

    monkeypatch.delenv(ENV_REMOTE, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AFFLUENT_SPARK", json.dumps(
        {"conn_type": "spark_connect", "host": "sc://localhost", "port": 15002, "password": "t0ken"}))
    url = remote_url()
    assert url == "sc://localhost:15002/;token=t0ken" and public_address(url) == "sc://localhost:15002"


def test_a_client_of_a_service_on_this_machine_does_not_make_its_queries_reattachable(connect):
    from jobs.core.session import is_loopback

    assert connect.client._use_reattachable_execute is False  # noqa: SLF001 - the client's own flag
    assert is_loopback("sc://localhost:15002/;token=t") and is_loopback("sc://127.0.0.1:1") and is_loopback("sc://[::1]:1")
    assert not is_loopback("sc://spark-connect:15002/;token=t") and not is_loopback("sc://10.0.0.7:15002")


def test_a_checkpoint_is_released_between_stages_never_by_the_garbage_collector(connect):
    """PySpark releases a checkpoint from a finaliser with a blocking call, which hangs when the collector runs
    inside another call; here the finaliser only notes it and the release is sent at a safe point."""
    import gc

    from pyspark.errors import PySparkException

    from jobs.core.checkpoints import pending, release_pending

    frame = connect.range(5).localCheckpoint()
    relation = frame._plan._relation_id  # noqa: SLF001 - the id the service keeps the rows under
    assert frame.count() == 5
    connect.requests.clear()
    del frame
    gc.collect()
    assert relation in pending() and not connect.requests  # noted; nothing sent from the finaliser
    assert release_pending() >= 1 and relation not in pending()
    assert relation.encode() in b"".join(connect.requests)
    gone = connect._create_remote_dataframe(relation)  # noqa: SLF001 - a reference to the released rows
    with pytest.raises(PySparkException, match=relation):
        gone.count()
    gone._plan._relation_id = None  # noqa: SLF001 - nothing left to release for this reference


def test_start_is_idempotent_and_status_says_where(service):
    from jobs.core import spark_service

    again = spark_service.start(service.state_dir)
    assert again.pid == service.pid and again.port == service.port
    assert oct(spark_service.token_path(service.state_dir).stat().st_mode & 0o777) == "0o600"
    status = _cli("spark", "status", "--state", str(service.state_dir))
    assert status.returncode == 0, status.stderr
    assert f"sc://localhost:{service.port}" in status.stdout and f"pid {service.pid}" in status.stdout
    assert service.token not in status.stdout + status.stderr
    stopped = _cli("spark", "status", "--state", str(service.state_dir / "none"))
    assert stopped.returncode == 1 and "no Spark service running" in stopped.stdout


def test_keyed_pseudonyms_come_from_the_service_key(connect):
    """Same values as Python's HMAC under the derived keys; the client named only the purposes."""
    from jobs.privacy.crypto import ServiceKey, SparkKey, hmac_sha256_hex

    key = ServiceKey(connect)
    assert key.fingerprint == _key().fingerprint
    values = ["ABCD12345678", "é-accentué", "x" * 200, None, ""]
    df = connect.createDataFrame([(v,) for v in values], "v string")
    for purpose in ("person", f"establishment:{EST}"):
        got = [r.h for r in df.select(hmac_sha256_hex(SparkKey(connect, key.derive(purpose)), "v").alias("h")).collect()]
        assert got == [hmac_hex(_key().derive(purpose), v) if v else None for v in values]


def test_key_bytes_are_refused_on_a_connect_session(connect):
    from jobs.privacy.crypto import SparkKey

    with pytest.raises(TypeError, match="ServiceKey"):
        SparkKey(connect, _key().person_key())


def test_a_batch_is_read_and_pseudonymised_through_the_service(connect, tmp_path, consortium):
    """The planted batch's patients: the CSV reader and the pseudonymisation transforms run on the service."""
    from jobs.privacy.crypto import ServiceKey
    from jobs.readers.csv import FileLineage, read_csv_file
    from jobs.stages.pseudonymise import (
        PERSON_FROM_NAM,
        Keyring,
        Parser,
        pseudonymise_patients,
    )

    folder = write_planted_batch(tmp_path / "landing")
    est = consortium.establishment(EST)
    now = dt.datetime(2026, 1, 5)
    read = read_csv_file(connect, folder / PATIENT_FILE, "patient", est.input, FileLineage(EST, BATCH, "f1", now, now))
    keyring = Keyring.for_establishment(connect, ServiceKey(connect), EST)
    rows = {r._source_line: r for r in pseudonymise_patients(read.bronze["patient"], keyring, Parser(est)).collect()}
    assert sorted(rows) == [2, 3, 4] and read.quarantine.count() == 0
    key = _key()
    for line, ref in ((2, "L001"), (3, "L002"), (4, "L003")):
        assert rows[line].patient_key == hmac_hex(key.establishment_key(EST), f"patient:{ref}")
    assert rows[3].person_id == hmac_hex(key.person_key(), f"{PERSON_FROM_NAM}:GAGL90010112")
    assert rows[4].person_id == hmac_hex(key.establishment_key(EST), "mrn:L003")  # no valid NAM: the record number


def test_no_key_in_requests_plans_or_logs(connect, service, caplog):
    """Neither the key nor a derived key (nor their HMAC pads) leaves the client or shows in the service."""
    from jobs.core.spark_service import log_path
    from jobs.privacy.crypto import ServiceKey, SparkKey, _padded, hmac_sha256_hex

    caplog.set_level(logging.DEBUG)
    connect.requests.clear()
    key = ServiceKey(connect)
    person = SparkKey(connect, key.person_key())
    df = connect.createDataFrame([("GAGL90010112",)], "v string").select(hmac_sha256_hex(person, "v").alias("h"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        df.explain(mode="extended")
    assert df.first().h
    sent = b"".join(connect.requests).decode("latin-1")
    event_log = Path(service.state_dir).parent / "event-log"
    logs = "".join(p.read_text(encoding="latin-1") for p in event_log.rglob("*") if p.is_file())
    text = "\n".join([sent, out.getvalue(), logs, log_path(service.state_dir).read_text(encoding="latin-1"),
                      caplog.text])
    # The scan can fail: the purpose and the function did travel, the plan and the event log were read.
    assert "affluent_keyed_hmac" in sent and "person" in sent and "affluent_keyed_hmac" in out.getvalue()
    assert "SQLExecutionStart" in logs
    master = _key()
    secrets = {"secret": master.secret, "person": master.person_key(), "establishment": master.establishment_key(EST)}
    for name, secret in secrets.items():
        for shown in (secret, *_padded(secret)):
            for encoded in encodings(shown):
                assert encoded not in text, f"{name} shows in a request, a plan or a log"
    assert service.token not in text.replace(sent, "")  # the token is a header of each call, never logged


def test_the_token_is_required(service):
    env = {"AFFLUENT_SPARK_REMOTE": service.address, "AFFLUENT_PSEUDONYM_KEY": ""}
    for token in ("not-the-token", ""):
        refused = _cli("spark", "check", **env, AFFLUENT_SPARK_TOKEN=token)
        assert refused.returncode == 4, refused.stderr
        assert refused.stderr.strip().count("\n") == 0 and "UNAUTHENTICATED" in refused.stderr
        assert service.address in refused.stderr and "Traceback" not in refused.stderr
    ok = _cli("spark", "check", **env, AFFLUENT_SPARK_TOKEN=service.token)
    assert ok.returncode == 0, ok.stderr
    assert f"holding the key with fingerprint {_key().fingerprint}" in ok.stdout


def test_a_command_says_where_the_service_is_down_and_works_once_it_is_back(service):
    """Stopped: one line naming the address, no traceback. Started again (same port, same token): it works."""
    from jobs.core import spark_service

    env = {"AFFLUENT_SPARK_REMOTE": service.address, "AFFLUENT_SPARK_TOKEN": service.token,
           "AFFLUENT_PSEUDONYM_KEY": ""}
    spark_service.stop(service.state_dir)
    down = _cli("spark", "check", **env)
    assert down.returncode == 4
    assert down.stderr.strip().count("\n") == 0 and "Traceback" not in down.stderr
    assert f"the Spark service at {service.address} is not reachable" in down.stderr
    assert "affluent spark start" in down.stderr
    saved = os.environ.get("AFFLUENT_PSEUDONYM_KEY")
    os.environ["AFFLUENT_PSEUDONYM_KEY"] = TEST_KEY
    try:
        back = spark_service.start(service.state_dir, port=service.port)
    finally:
        os.environ.pop("AFFLUENT_PSEUDONYM_KEY") if saved is None else os.environ.__setitem__("AFFLUENT_PSEUDONYM_KEY",
                                                                                            saved)
    assert back.token == service.token  # clients configured with it need no change
    again = _cli("spark", "check", **env)
    assert again.returncode == 0, again.stderr


def test_a_service_process_that_ended_is_not_alive_even_unreaped():
    """A stopped service started by this very process (a test, ``affluent demo``) is a zombie until reaped:
    ``stop`` must see it gone at once, not wait out its timeout."""
    from jobs.core.spark_service import _alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    status = Path(f"/proc/{child.pid}/stat")
    while status.read_text().split(") ", 1)[1][0] != "Z":  # ended, not yet reaped
        time.sleep(0.01)
    assert not _alive(child.pid)
    assert _alive(os.getpid())
