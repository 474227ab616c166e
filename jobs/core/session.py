"""The one place that builds a SparkSession with Delta Lake.

Every job receives the session as a parameter; nothing else in the project
calls ``SparkSession.builder``.

Two kinds of session: a Spark Connect client of the deployment's Spark service
(:mod:`jobs.core.spark_service`) when an address is configured —
``AFFLUENT_SPARK_REMOTE`` (with ``AFFLUENT_SPARK_TOKEN``), or inside Airflow the
connection ``affluent_spark`` of the Spark provider's Spark Connect type — and
otherwise the classic session with its own JVM in this process.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import weakref
from pathlib import Path

from delta import configure_spark_with_delta_pip
from pyspark.sql import SparkSession

from jobs.core.local_fs import local_fs_conf
from jobs.core.settings import Settings

# Extra Maven packages for object storage; only added when the lake is on s3a://.
S3A_PACKAGES = ["org.apache.hadoop:hadoop-aws:3.5.0"]
# Spark's verbosity: WARN by default (quiet), INFO or DEBUG to investigate.
ENV_SPARK_LOG_LEVEL = "AFFLUENT_SPARK_LOG_LEVEL"
DEFAULT_SPARK_LOG_LEVEL = "WARN"
# Extra options for the driver JVM (e.g. ``-XX:MaxRAMPercentage=…``).
ENV_JAVA_OPTIONS = "AFFLUENT_JAVA_OPTIONS"
# Spark compiles each query's expressions and stages to Java bytecode ("on", the default). On
# tiny data (the test suite, a few hundred rows per batch) compiling, loading and JIT-compiling
# that code costs more than it saves: "off" evaluates the same plans interpreted.
ENV_CODEGEN = "AFFLUENT_SPARK_CODEGEN"
CODEGEN_OFF = {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}
# Adaptive query execution ("on", Spark's default) re-plans a query after each of its shuffle
# stages, each stage a job of its own. On tiny data there is nothing to adapt to and the
# re-planning is driver time: "off" plans each query once.
ENV_ADAPTIVE = "AFFLUENT_SPARK_ADAPTIVE"
ADAPTIVE_OFF = {"spark.sql.adaptive.enabled": "false"}
# The Spark service's address (``sc://host:port``) and its token; unset: a classic session in this process.
ENV_REMOTE = "AFFLUENT_SPARK_REMOTE"
ENV_TOKEN = "AFFLUENT_SPARK_TOKEN"
AIRFLOW_CONN_ID = "affluent_spark"
# How long a client waits for the service's port before saying it is down.
REACH_TIMEOUT_S = 5.0
LOG4J_CONFIG = Path(__file__).resolve().parent / "log4j2.properties"
JVM_LOGGER = logging.getLogger("affluent.spark")
_LOG4J_LINE = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (TRACE|DEBUG|INFO|WARN|ERROR|FATAL) ")
_LEVELS = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
           "ERROR": logging.ERROR, "FATAL": logging.CRITICAL}


def spark_log_level() -> str:
    level = os.environ.get(ENV_SPARK_LOG_LEVEL, DEFAULT_SPARK_LOG_LEVEL).upper()
    if level not in _LEVELS:
        raise ValueError(f"{ENV_SPARK_LOG_LEVEL}={level!r}: use one of {', '.join(_LEVELS)}")
    return level


def _switch(name: str, off: dict[str, str]) -> dict[str, str]:
    value = os.environ.get(name, "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{name}={value!r}: use on (the default) or off")
    return dict(off) if value == "off" else {}


def codegen_conf() -> dict[str, str]:
    """The Spark settings :data:`ENV_CODEGEN` asks for; an unknown value is refused, not ignored."""
    return _switch(ENV_CODEGEN, CODEGEN_OFF)


def adaptive_conf() -> dict[str, str]:
    """The Spark settings :data:`ENV_ADAPTIVE` asks for; an unknown value is refused, not ignored."""
    return _switch(ENV_ADAPTIVE, ADAPTIVE_OFF)


def execution_mode_conf() -> dict[str, str]:
    """Code generation and adaptive execution as the environment asks (both on unless said otherwise)."""
    return codegen_conf() | adaptive_conf()


# A batch whose landing files total less than this many MiB runs its session interpreted and planned
# once (as ENV_CODEGEN=off and ENV_ADAPTIVE=off), its shuffles into one partition, whatever the
# service's own defaults: a few thousand rows cost what Spark spends compiling and re-planning each
# query and scheduling a task per partition, not the rows. Larger batches get the service's defaults back.
ENV_SMALL_BATCH_MB = "AFFLUENT_SMALL_BATCH_MB"
DEFAULT_SMALL_BATCH_MB = 32
# Shuffle partitions of every session (and the default parallelism of an in-process Spark).
ENV_SHUFFLE_PARTITIONS = "AFFLUENT_SHUFFLE_PARTITIONS"
SHUFFLE_ONE = {"spark.sql.shuffle.partitions": "1"}
# What the small-batch mode sets, each group unless its own setting is in the environment (then it wins).
SMALL_BATCH_CONF = ((ENV_CODEGEN, CODEGEN_OFF), (ENV_ADAPTIVE, ADAPTIVE_OFF), (ENV_SHUFFLE_PARTITIONS, SHUFFLE_ONE))


def small_batch_bytes() -> int:
    """:data:`ENV_SMALL_BATCH_MB` in bytes; a value that is not a non-negative number is refused."""
    raw = os.environ.get(ENV_SMALL_BATCH_MB, str(DEFAULT_SMALL_BATCH_MB)).strip()
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if not 0 <= mib < float("inf"):  # also refuses nan
        raise ValueError(f"{ENV_SMALL_BATCH_MB}={raw!r}: use a number of MiB (0 turns the small-batch mode off)")
    return int(mib * 1024 * 1024)


# Per session: its settings before the first batch tuned it, to go back to for a large batch.
_UNTUNED: weakref.WeakKeyDictionary[SparkSession, dict[str, str | None]] = weakref.WeakKeyDictionary()


def tune_for_batch(spark: SparkSession, landing_bytes: int | None) -> dict[str, str | None]:
    """Set this session's execution mode for a batch of ``landing_bytes``; the settings it now has.

    Below :func:`small_batch_bytes`, code generation and adaptive execution are off for the
    session and its shuffles have one partition; at or above it, or when the size is not known
    (None: the landing folder is gone), the session gets back the settings it had before it was
    first tuned (the service's own). A setting given explicitly in
    this process's environment (:data:`ENV_CODEGEN`, :data:`ENV_ADAPTIVE`,
    :data:`ENV_SHUFFLE_PARTITIONS`) wins: that group is not changed. Each setting is one round trip.

    Example::

        tune_for_batch(spark, sum(f.stat().st_size for f in batch_folder.rglob("*") if f.is_file()))
    """
    small: dict[str, str] = {}
    for env, conf in SMALL_BATCH_CONF:
        if env not in os.environ:
            small |= conf
    if not small:
        return {}
    untuned = _UNTUNED.get(spark)
    if untuned is None:
        untuned = _UNTUNED[spark] = {key: spark.conf.get(key, None) for key in small}
    wanted: dict[str, str | None] = (dict(small) if landing_bytes is not None and landing_bytes < small_batch_bytes()
                                     else {key: untuned.get(key) for key in small})
    for key, value in wanted.items():
        if value is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, value)
    return wanted


def session_builder(settings: Settings, app_name: str = "affluent", extra_conf: dict[str, str] | None = None) -> SparkSession.Builder:
    """Return a builder configured for Delta, small machines and quiet logs.

    Example::

        spark = session_builder(Settings.from_env()).getOrCreate()
    """
    settings.jars_cache.mkdir(parents=True, exist_ok=True)
    builder = (
        SparkSession.builder.master(settings.spark_master)
        .appName(app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        # Jars are resolved once from Maven Central and cached inside the project.
        .config("spark.jars.ivy", str(settings.jars_cache))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        # Defaults that suit a 2-core machine; a cluster overrides them.
        .config("spark.sql.shuffle.partitions", os.environ.get(ENV_SHUFFLE_PARTITIONS, "8"))
        .config("spark.default.parallelism", os.environ.get(ENV_SHUFFLE_PARTITIONS, "8"))
        .config("spark.databricks.delta.snapshotPartitions", "2")
        # VACUUM lists and deletes files in as many tasks as this (Spark's default, 10 000, costs
        # half a minute of empty tasks per VACUUM on a small machine).
        .config("spark.sql.sources.parallelPartitionDiscovery.parallelism",
                os.environ.get(ENV_SHUFFLE_PARTITIONS, "8"))
        .config("spark.databricks.delta.schema.autoMerge.enabled", "false")
        # Delta's checksum files need not list every file of the table: with the list, each CREATE TABLE
        # reconstructs the state of the table before it (a Spark job) to start the list, and each commit
        # extends it; no read here uses it (a scan still computes the table's state).
        .config("spark.databricks.delta.allFilesInCrc.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", os.environ.get("AFFLUENT_DRIVER_MEMORY", "4g"))
        .config("spark.sql.warehouse.dir", str(Path(settings.jars_cache).parent / "warehouse"))
        .config("spark.driver.extraJavaOptions",
                f"-Dderby.system.home=/tmp -Dlog4j2.configurationFile={LOG4J_CONFIG.as_uri()} "
                f"-Daffluent.spark.log.level={spark_log_level()} {os.environ.get(ENV_JAVA_OPTIONS, '')}".strip())
    )
    extra_packages: list[str] = []
    if settings.lake_root.startswith("s3a://"):
        extra_packages.extend(S3A_PACKAGES)
    for key, value in (execution_mode_conf() | local_fs_conf(settings.spark_master) | (extra_conf or {})).items():
        builder = builder.config(key, value)
    return configure_spark_with_delta_pip(builder, extra_packages=extra_packages)


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect client session (no JVM, no RDD, no SparkContext here).

    By its class's module: importing pyspark's Connect client (gRPC, pandas) is not needed to tell.
    """
    return type(spark).__module__.startswith("pyspark.sql.connect.")


def _from_airflow() -> str | None:
    """The ``affluent_spark`` connection's URL, token included, when this process is an Airflow task."""
    # Only in an Airflow task (or with the connection in the environment): a CLI or a test never pays
    # Airflow's import, nor a metadata look-up, to find none.
    in_task = "airflow.sdk.execution_time.task_runner" in sys.modules
    if not in_task and f"AIRFLOW_CONN_{AIRFLOW_CONN_ID.upper()}" not in os.environ:
        return None
    try:
        from airflow.providers.apache.spark.hooks.spark_connect import SparkConnectHook

        return SparkConnectHook(AIRFLOW_CONN_ID).get_connection_url()
    except Exception:  # noqa: BLE001 - a missing connection means "no service configured here"
        return None


def remote_url() -> str | None:
    """The Spark service's Connect URL (token included: never print it), or None for a classic session."""
    address = os.environ.get(ENV_REMOTE, "").strip()
    if not address:
        return _from_airflow()
    token = os.environ.get(ENV_TOKEN, "").strip()
    if token and "token=" not in address:
        address = f"{address.rstrip('/')}/;token={token}"
    return address


def public_address(url: str) -> str:
    """``sc://host:port`` of a Connect URL, without its parameters (the token)."""
    return url.split("/;", 1)[0].rstrip("/")


def _check_reachable(url: str) -> None:
    from urllib.parse import urlparse

    from jobs.core.spark_service import SparkServiceUnavailable

    parsed = urlparse(public_address(url))
    host, port = parsed.hostname or "localhost", parsed.port or 15002
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise SparkServiceUnavailable(
            f"the Spark service at {public_address(url)} is not reachable ({exc.strerror or exc}): start it with "
            "`affluent spark start`, or check the address (AFFLUENT_SPARK_REMOTE or the Airflow connection "
            f"{AIRFLOW_CONN_ID})") from None


def _rpc_reason(exc: Exception) -> str:
    """The gRPC status and details of a refused call (``UNAUTHENTICATED: Invalid authentication token``)."""
    rpc = exc.__context__ or exc
    code, details = getattr(rpc, "code", None), getattr(rpc, "details", None)
    if callable(code) and callable(details):
        name = getattr(code(), "name", str(code()))
        hint = " (check AFFLUENT_SPARK_TOKEN or the connection's token)" if name == "UNAUTHENTICATED" else ""
        return f"{name}: {details()}{hint}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# One client session per service URL and process (a command, a task), reused by every job in it.
_CLIENTS: dict[str, SparkSession] = {}


def is_loopback(url: str) -> bool:
    """Whether a Spark Connect URL names this machine (``localhost``, ``127.x``, ``::1``)."""
    match = re.match(r"^sc://(\[[^\]]*\]|[^:/;]+)", url)
    host = match.group(1).strip("[]").lower() if match else ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def get_connect(url: str) -> SparkSession:
    """A Spark Connect client session of the service at ``url``; a clear error when it is down or refuses us."""
    from pyspark.errors import PySparkException

    from jobs.core.spark_service import SparkServiceUnavailable

    _check_reachable(url)
    from jobs.core.checkpoints import defer_releases, release_pending

    known = _CLIENTS.get(url)
    if known is not None and not getattr(known, "is_stopped", False):  # a Connect session's own attribute
        release_pending()
        return known
    defer_releases()  # checkpoints are released between stages, never from the garbage collector
    # The generic builder (not ConnectSession's own) also switches pyspark's functions to Connect mode.
    spark = SparkSession.builder.remote(url).create()
    if is_loopback(url):
        # A reattachable execution lets a query outlive a dropped connection, at the price of a release call
        # per response (about 1,500 per validated batch). On loopback there is no network to drop.
        spark.client.disable_reattachable_execute()
    _CLIENTS[url] = spark
    try:
        _ = spark.version  # one round trip: a wrong token or a dead server shows here, not in the middle of a job
    except PySparkException as exc:
        spark.stop()
        raise SparkServiceUnavailable(f"the Spark service at {public_address(url)} refused the session: "
                                      f"{_rpc_reason(exc)}") from None
    return spark


def close_clients() -> None:
    """End this process's client sessions (before their service stops: a session left open waits for it at exit)."""
    while _CLIENTS:
        _, spark = _CLIENTS.popitem()
        spark.stop()


def get_spark(settings: Settings | None = None, app_name: str = "affluent", extra_conf: dict[str, str] | None = None,
              classic: bool = False) -> SparkSession:
    """The Spark service's client session when one is configured (:func:`remote_url`), else a classic one.

    ``classic=True`` always builds the in-process session (the service itself
    does). A client takes the service's settings as they are: ``extra_conf``
    only applies to a classic session.
    """
    url = None if classic else remote_url()
    if url:
        return get_connect(url)
    settings = settings or Settings.from_env()
    builder = session_builder(settings, app_name, extra_conf)
    _launch_jvm_logging_to_python(builder)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(spark_log_level())
    return spark


def _pump(read_fd: int) -> None:
    """Log each line the JVM writes at the level log4j gave it (Ivy and banners: INFO)."""
    level = logging.INFO
    with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            line = line.rstrip("\n")
            if not line:
                continue
            match = _LOG4J_LINE.match(line)
            if match:
                level = _LEVELS[match.group(1)]
            elif not line.startswith(("\t", "Caused by", "  ")):
                level = logging.INFO  # not a continuation of a logged exception
            JVM_LOGGER.log(level, "%s", line)


def _launch_jvm_logging_to_python(builder: SparkSession.Builder) -> None:
    """Start the driver JVM with a pipe for its stdout and stderr, read by a thread that logs each line.

    Without this the JVM inherits the process's stderr, and a scheduler that
    reads stderr as errors (Airflow does) shows Spark's start-up banner, Ivy's
    report and every warning as ERROR. The gateway is launched exactly as
    ``SparkContext`` would launch it (same configuration), only with its
    output piped; ``getOrCreate`` then reuses it.
    """
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    with SparkContext._lock:  # noqa: SLF001 - the same guard SparkContext uses
        if SparkContext._gateway is not None:  # noqa: SLF001 - a JVM is already running: reuse it
            return
        conf = SparkConf()
        for key, value in builder._options.items():  # noqa: SLF001 - the options getOrCreate would pass
            conf.set(key, value)
        read_fd, write_fd = os.pipe()
        threading.Thread(target=_pump, args=(read_fd,), name="spark-jvm-log", daemon=True).start()
        try:
            gateway = launch_gateway(conf, popen_kwargs={"stdout": write_fd, "stderr": write_fd})
        finally:
            os.close(write_fd)  # the JVM holds its own copy; the pump ends when the JVM does
        SparkContext._gateway = gateway  # noqa: SLF001
        SparkContext._jvm = gateway.jvm  # noqa: SLF001


def resolve_jars(settings: Settings | None = None) -> list[str]:
    """Fetch Delta's jars (and the S3A ones) into the project's Ivy cache once, at set-up time.

    ``scripts/bootstrap`` calls this so that no pipeline task and no test
    downloads anything: the first Spark start of a fresh machine then finds
    every jar in ``.cache/ivy``. A marker records what was resolved.
    """
    settings = settings or Settings.from_env()
    s3a = Settings(lake_root="s3a://resolve-only/lake", spark_master="local[1]", config_dir=settings.config_dir,
                   jars_cache=settings.jars_cache, landing_root=settings.landing_root)
    builder = session_builder(s3a, app_name="affluent-resolve-jars")
    packages = builder._options.get("spark.jars.packages", "").split(",")  # noqa: SLF001 - what Spark will resolve
    marker = settings.jars_cache / ".resolved"
    if marker.is_file() and marker.read_text(encoding="utf-8").split() == packages:
        return packages
    builder.getOrCreate().stop()
    marker.write_text("\n".join(packages) + "\n", encoding="utf-8")
    return packages


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--resolve-jars"]:
        sys.exit("usage: python -m jobs.core.session --resolve-jars")
    print("==> Spark jars cached in .cache/ivy: " + ", ".join(resolve_jars()))
