"""One warm Spark for a deployment: a Spark Connect server that jobs reach as thin clients.

Starting a Spark driver costs about 20 s and every query then runs on a cold
JVM; a service started once keeps both warm. ``affluent spark start`` runs it
on this machine: the same Spark settings as :func:`jobs.core.session.session_builder`
(Delta, the project's cached jars), Spark Connect bound to loopback only and
refusing any client without the service's token, and the pseudonymisation key
read by the service itself (:mod:`jobs.privacy.crypto`): clients never hold it.

What a running service leaves in its state folder (``.cache/spark-service`` by
default, never the lake; ``AFFLUENT_SPARK_STATE`` moves it):

- ``service.json``: pid, address, port, start time (no secret);
- ``token``: the clients' bearer token, readable by its owner only (kept across restarts);
- ``service.log``: the service's own log (Spark's lines at ``AFFLUENT_SPARK_LOG_LEVEL``).

Example::

    affluent spark start            # idempotent: a running service is reused
    affluent spark status
    affluent spark check            # as a client: address, Spark version, the fingerprint of the key it holds
    affluent spark stop
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from jobs.core.settings import PROJECT_ROOT, Settings

ENV_STATE_DIR = "AFFLUENT_SPARK_STATE"
DEFAULT_STATE_DIR = PROJECT_ROOT / ".cache" / "spark-service"
ENV_PORT = "AFFLUENT_SPARK_PORT"
ENV_EVENT_LOG = "AFFLUENT_SPARK_EVENT_LOG"
DEFAULT_PORT = 15002  # Spark Connect's own default port
# Spark Connect's pre-shared bearer token: the server reads it from this variable (Spark's
# ``spark.connect.authenticate.token`` would print it in the environment page and event log).
SERVER_TOKEN_ENV = "SPARK_CONNECT_AUTHENTICATE_TOKEN"
CONNECT_PLUGIN = "org.apache.spark.sql.connect.SparkConnectPlugin"
# Loopback only: the embedded service is for processes of this machine (a container on a private
# network sets AFFLUENT_SPARK_BIND=0.0.0.0). The client must say "localhost" (not 127.0.0.1): that
# is the name pyspark sends a token over without TLS.
BIND_ADDRESS = "127.0.0.1"
ENV_BIND = "AFFLUENT_SPARK_BIND"
CLIENT_HOST = "localhost"
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
# How long the service lets Spark stop cleanly before it ends its own JVM (see serve).
SERVE_STOP_GRACE_S = 10.0


class SparkServiceError(RuntimeError):
    """The Spark service could not be started, reached or stopped; the message says what to do."""


class SparkServiceUnavailable(SparkServiceError):
    """A client found no service at the configured address (or it refused the client's token)."""


class ServiceKeyMismatch(SparkServiceError):
    """The running service holds another pseudonymisation key than the one the command was given."""


# How a command runs its Spark work: as a client of the Spark service (the default; the command starts
# the service when none runs), or "classic", in a Spark of its own inside the process (tests, debugging).
ENV_MODE = "AFFLUENT_SPARK_MODE"
MODE_SERVICE = "service"
MODE_CLASSIC = "classic"
# Where a command finds the pseudonymisation key it hands to the service (jobs.privacy.keys reads the same).
KEY_ENVIRONMENT = ("AFFLUENT_PSEUDONYM_KEY", "AFFLUENT_PSEUDONYM_KEY_FILE")


def spark_mode(classic: bool = False) -> str:
    """``classic`` when asked (a flag, or ``AFFLUENT_SPARK_MODE=classic``), else ``service``; other values refused."""
    if classic:
        return MODE_CLASSIC
    value = os.environ.get(ENV_MODE, MODE_SERVICE).strip().lower() or MODE_SERVICE
    if value not in (MODE_SERVICE, MODE_CLASSIC):
        raise SparkServiceError(f"{ENV_MODE}={value!r}: use {MODE_SERVICE} (the default) or {MODE_CLASSIC}")
    return value


@dataclass(frozen=True)
class ServiceState:
    """A running service as recorded in its state folder."""

    pid: int
    port: int
    started_at: float
    state_dir: Path

    @property
    def address(self) -> str:
        return f"sc://{CLIENT_HOST}:{self.port}"

    @property
    def token(self) -> str:
        return token_path(self.state_dir).read_text(encoding="ascii").strip()

    @property
    def remote(self) -> str:
        """The Spark Connect URL a client uses, token included (never print it)."""
        return f"{self.address}/;token={self.token}"

    def describe(self) -> str:
        uptime = int(time.time() - self.started_at)
        return (f"Spark service running at {self.address} (pid {self.pid}, up {uptime // 3600}h{uptime // 60 % 60:02d}m"
                f"{uptime % 60:02d}s); log {log_path(self.state_dir)}")


def state_dir(explicit: Path | str | None = None) -> Path:
    return Path(explicit or os.environ.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR)


def state_path(folder: Path) -> Path:
    return folder / "service.json"


def token_path(folder: Path) -> Path:
    return folder / "token"


def log_path(folder: Path) -> Path:
    return folder / "service.log"


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A service this process started (a test, ``affluent demo``) is its child:
    once it has ended it stays a zombie, which signal 0 still reaches, until reaped here."""
    try:
        ended, _ = os.waitpid(pid, os.WNOHANG)
        if ended:
            return False
    except ChildProcessError:
        pass  # not this process's child: whoever started it reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listening(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((BIND_ADDRESS, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_state(folder: Path | None = None) -> ServiceState | None:
    """The running service of ``folder``, or None (no record, or its process is gone: the record is removed)."""
    folder = state_dir(folder)
    path = state_path(folder)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    state = ServiceState(int(record["pid"]), int(record["port"]), float(record["started_at"]), folder)
    if not _alive(state.pid):
        path.unlink(missing_ok=True)
        return None
    return state


def ensure_token(folder: Path) -> Path:
    """The clients' token file, created (owner-only) unless it exists.

    Kept across restarts, so that clients configured with it (an Airflow
    connection, a retried task) reach the restarted service; remove the file
    to issue a new one at the next start.
    """
    path = token_path(folder)
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
    return path


def _free_port(preferred: int) -> int:
    with socket.socket() as probe:
        try:
            probe.bind((BIND_ADDRESS, preferred))
            return preferred
        except OSError:
            probe.bind((BIND_ADDRESS, 0))
            return int(probe.getsockname()[1])


# What makes a process a Spark Connect client: the service is the classic session its clients share,
# so it inherits none of it from whoever starts it (a client, a test, an Airflow task).
_CLIENT_ENVIRONMENT = ("SPARK_CONNECT_MODE_ENABLED", "SPARK_REMOTE", "AFFLUENT_SPARK_REMOTE", "AFFLUENT_SPARK_TOKEN")


def _service_environment(key_source: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its client settings, with the key of ``key_source`` (and no other)."""
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENVIRONMENT + KEY_ENVIRONMENT}
    env.update({name: key_source[name] for name in KEY_ENVIRONMENT if key_source.get(name)})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def start(folder: Path | str | None = None, port: int | None = None, timeout: float = START_TIMEOUT_S,
          key_source: Mapping[str, str] | None = None) -> ServiceState:
    """Start the service unless one runs already (then return it); wait until it accepts clients.

    The service runs detached (its own session), so it outlives the command, the
    DAG run or the Airflow that started it; ``stop`` ends it. It reads the key
    from ``key_source``'s ``AFFLUENT_PSEUDONYM_KEY`` or ``AFFLUENT_PSEUDONYM_KEY_FILE``
    (default: this process's environment), given to its environment only.
    """
    folder = state_dir(folder)
    running = read_state(folder)
    if running is not None:
        return running
    from jobs.privacy.crypto import ensure_udf_jar
    from jobs.privacy.keys import load_key

    key_source = os.environ if key_source is None else key_source
    load_key(dict(key_source), use_airflow=False)  # fail closed here with the key's own message
    ensure_udf_jar()
    folder.mkdir(parents=True, exist_ok=True)
    chosen = port or int(os.environ.get(ENV_PORT, DEFAULT_PORT))
    chosen = _free_port(chosen) if not port else chosen
    ensure_token(folder)
    with open(log_path(folder), "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs.core.spark_service", "serve", "--state", str(folder), "--port", str(chosen)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=str(PROJECT_ROOT), env=_service_environment(key_source))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SparkServiceError(f"the Spark service exited at start (code {process.returncode}); see the end of "
                                    f"{log_path(folder)}")
        state = read_state(folder)
        if state is not None and _listening(state.port):
            return state
        time.sleep(0.5)
    process.terminate()
    raise SparkServiceError(f"the Spark service did not accept clients on port {chosen} within {timeout:.0f} s; "
                            f"see {log_path(folder)}")


def stop(folder: Path | str | None = None, timeout: float = STOP_TIMEOUT_S) -> ServiceState | None:
    """Stop the service cleanly (SIGTERM: Spark stops, then the process); the stopped service, or None."""
    folder = state_dir(folder)
    state = read_state(folder)
    if state is None:
        return None
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.3)
    if _alive(state.pid):
        # Spark did not stop in time: the whole process group (the service runs in a session of its own),
        # so that its JVM goes too rather than outliving it as an orphan.
        try:
            os.killpg(state.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            os.kill(state.pid, signal.SIGKILL)
    state_path(folder).unlink(missing_ok=True)
    return state


def held_fingerprint(state: ServiceState) -> str:
    """The fingerprint of the key the service holds, asked of the service itself (as ``affluent spark check``)."""
    from jobs.core.session import get_connect
    from jobs.privacy.crypto import ServiceKey

    return ServiceKey(get_connect(state.remote)).fingerprint


def ensure(key_source: Mapping[str, str], folder: Path | str | None = None) -> tuple[ServiceState, bool]:
    """The service for the key of ``key_source``: started unless one runs; whether this call started it.

    A command without a key uses a running service as it is (and cannot start
    one). A running service that holds another key is refused, never reused: its
    pseudonyms would not match the lake's (the tables record the key's
    fingerprint and the land stage refuses a mismatch too, but only after the
    batch has been read and keyed).
    """
    from jobs.privacy.keys import load_key

    folder = state_dir(folder)
    running = read_state(folder)
    if running is not None and not any(key_source.get(name) for name in KEY_ENVIRONMENT):
        return running, False  # a thin client without a key: the service's key is the deployment's
    expected = load_key(dict(key_source), use_airflow=False).fingerprint
    state = running or start(folder, key_source=key_source)
    held = held_fingerprint(state)
    if held != expected:
        raise ServiceKeyMismatch(
            f"the Spark service at {state.address} holds the key with fingerprint {held}, not this command's "
            f"({expected}): stop it (`affluent spark stop`) to start one with this key, or give the command the "
            "key the service holds")
    return state, running is None


def check() -> str:
    """Reach the configured service as a client would; one line: address, Spark version, key fingerprint."""
    from jobs.core.session import get_spark, public_address, remote_url
    from jobs.privacy.crypto import ServiceKey

    url = remote_url()
    if not url:
        raise SparkServiceError("no Spark service configured: set AFFLUENT_SPARK_REMOTE and AFFLUENT_SPARK_TOKEN "
                                "(`affluent spark start` prints them), or the Airflow connection affluent_spark")
    spark = get_spark()
    return (f"Spark service at {public_address(url)}: Spark {spark.version}, "
            f"holding the key with fingerprint {ServiceKey(spark).fingerprint}")


def service_conf(port: int) -> dict[str, str]:
    """Spark settings that make a session a Spark Connect service (on top of the project's own settings)."""
    from jobs.privacy.crypto import udf_jar

    return {
        "spark.plugins": CONNECT_PLUGIN,
        "spark.connect.grpc.binding.address": os.environ.get(ENV_BIND, BIND_ADDRESS),
        "spark.connect.grpc.binding.port": str(port),
        # The keyed functions run in the service (and its executors), which read the key themselves.
        "spark.jars": str(udf_jar()),
    } | event_log_conf()


def event_log_conf() -> dict[str, str]:
    """Spark's event log (for a history server, or an audit of what ran) when ``AFFLUENT_SPARK_EVENT_LOG`` names a folder."""
    folder = os.environ.get(ENV_EVENT_LOG, "").strip()
    if not folder:
        return {}
    Path(folder).mkdir(parents=True, exist_ok=True)
    return {"spark.eventLog.enabled": "true", "spark.eventLog.dir": folder, "spark.eventLog.compress": "false"}


def serve(folder: Path, port: int) -> int:
    """Run the service in this process until SIGTERM or SIGINT; record it once it accepts clients."""
    from jobs.core.session import get_spark
    from jobs.privacy.crypto import ensure_udf_jar
    from jobs.privacy.keys import load_key

    # Spark's own lines (jobs.core.session pipes them to the ``affluent.spark`` logger) go to service.log.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_key(use_airflow=False)  # the service holds the key: without a usable one it does not start
    ensure_udf_jar()
    os.environ[SERVER_TOKEN_ENV] = token_path(folder).read_text(encoding="ascii").strip()
    for name in _CLIENT_ENVIRONMENT:  # the service is the classic session its clients share
        os.environ.pop(name, None)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    spark = get_spark(Settings.from_env(), app_name="affluent-spark-service", extra_conf=service_conf(port),
                      classic=True)
    record = {"pid": os.getpid(), "port": port, "started_at": time.time()}
    tmp = state_path(folder).with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    tmp.replace(state_path(folder))
    print(f"Spark service ready at sc://{CLIENT_HOST}:{port} (pid {os.getpid()})", flush=True)
    stopping.wait()
    print("Spark service stopping", flush=True)
    # Spark's stop waits for the Connect server to drain, which it does not while a client session is
    # open (a notebook, a task still holding its session): after a short grace the JVM goes with us.
    stopper = threading.Thread(target=spark.stop, name="spark-stop", daemon=True)
    stopper.start()
    stopper.join(SERVE_STOP_GRACE_S)
    state_path(folder).unlink(missing_ok=True)
    if stopper.is_alive():
        print(f"Spark did not stop within {SERVE_STOP_GRACE_S:.0f} s (clients still connected): ending its JVM",
              flush=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jobs.core.spark_service")
    parser.add_argument("action", choices=["serve"])
    parser.add_argument("--state", required=True)
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    sys.exit(serve(Path(arguments.state), arguments.port))
