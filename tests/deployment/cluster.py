"""Loopback stand-ins for the distributed deployment: a Spark standalone cluster and an S3 server.

Test tooling, not part of the shipped package: the pipeline never imports it. It exists so that the pieces the
``docker-compose.yml`` deployment relies on (a ``spark://`` master reached
through the ``spark_default`` Airflow connection, a lake on ``s3a://``) can be
exercised on one machine without a container engine:

* :func:`start_standalone_cluster` runs a Spark master and one worker from the
  pyspark distribution (``spark-class``), bound to 127.0.0.1;
* :func:`start_s3proxy` runs s3proxy (an S3-compatible server, from Maven
  Central) on 127.0.0.1 with a filesystem backend and a test access key.

Tests never download: ``scripts/bootstrap`` runs ``python -m
tests.deployment.cluster fetch`` once, which caches the s3proxy jar in
``.cache/maven``; a test finds it there or fails with what to run.

Example::

    with start_standalone_cluster(tmp_path / "spark") as cluster:
        print(cluster.master_url)          # spark://127.0.0.1:<port>
        print(cluster.connection_uri)      # what AIRFLOW_CONN_SPARK_DEFAULT holds
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from jobs.core.settings import PROJECT_ROOT

MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
MAVEN_CACHE = PROJECT_ROOT / ".cache" / "maven"
S3PROXY = ("org.gaul", "s3proxy", "4.1.0", "jar-with-dependencies")
LOOPBACK = "127.0.0.1"


class ServiceStartError(RuntimeError):
    """A local service did not come up in time; its log tail is in the message."""


def spark_home() -> Path:
    """The Spark distribution bundled in the pyspark wheel (``bin/spark-class``, ``jars/``)."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def bundled_hadoop_version() -> str:
    """The Hadoop version of pyspark's jars: ``hadoop-aws`` must match it exactly."""
    jars = sorted((spark_home() / "jars").glob("hadoop-client-api-*.jar"))
    if not jars:
        raise FileNotFoundError(f"no hadoop-client-api jar under {spark_home() / 'jars'}")
    return jars[0].stem.removeprefix("hadoop-client-api-")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceStartError(f"process exited with {process.returncode}:\n{_tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.3)
    raise ServiceStartError(f"nothing listening on {LOOPBACK}:{port} after {timeout:.0f}s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
    for process in reversed(processes):
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _loopback_env() -> dict[str, str]:
    env = dict(os.environ, SPARK_HOME=str(spark_home()), SPARK_LOCAL_IP=LOOPBACK)
    env.pop("SPARK_CONF_DIR", None)
    return env


@dataclass
class StandaloneCluster:
    """A running Spark standalone master with its workers, all on 127.0.0.1."""

    master_url: str
    webui_url: str
    work_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def connection_uri(self) -> str:
        """The Airflow connection URI naming this master (the value of ``AIRFLOW_CONN_SPARK_DEFAULT``)."""
        return self.master_url

    def state(self) -> dict:
        """The master's own view (``/json``): workers, running and completed applications."""
        with urllib.request.urlopen(f"{self.webui_url}/json/", timeout=10) as response:
            return json.load(response)

    def stop(self) -> None:
        _stop(self.processes)

    def __enter__(self) -> "StandaloneCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive_workers(cluster: StandaloneCluster) -> int:
    try:
        return cluster.state().get("aliveworkers", 0)
    except (urllib.error.URLError, ValueError):  # 404, or an empty page, until the UI's handlers are attached
        return 0


def start_standalone_cluster(work_dir: Path, workers: int = 1, worker_cores: int = 1,
                             worker_memory: str = "1g", timeout: float = 90,
                             background: bool = False) -> StandaloneCluster:
    """Start ``spark-class`` Master and Worker processes bound to loopback and wait for the workers.

    ``background`` runs them (and so the executors a worker starts) at a lower CPU priority.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    spark_class = str(spark_home() / "bin" / "spark-class")
    from tests.background import lower_priority

    prefix = lower_priority([]) if background else []
    env = _loopback_env()
    port, webui_port = free_port(), free_port()
    master_url = f"spark://{LOOPBACK}:{port}"
    processes: list[subprocess.Popen] = []
    try:
        master_log = work_dir / "master.log"
        processes.append(subprocess.Popen(
            [*prefix, spark_class, "org.apache.spark.deploy.master.Master",
             "--host", LOOPBACK, "--port", str(port), "--webui-port", str(webui_port)],
            stdout=master_log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=work_dir))
        _wait_for_port(port, processes[0], master_log, timeout)
        _wait_for_port(webui_port, processes[0], master_log, timeout)
        for index in range(workers):
            worker_dir = work_dir / f"worker-{index}"
            worker_dir.mkdir(exist_ok=True)
            processes.append(subprocess.Popen(
                [*prefix, spark_class, "org.apache.spark.deploy.worker.Worker",
                 "--host", LOOPBACK, "--cores", str(worker_cores), "--memory", worker_memory,
                 "--webui-port", str(free_port()), "--work-dir", str(worker_dir), master_url],
                stdout=(work_dir / f"worker-{index}.log").open("w"), stderr=subprocess.STDOUT,
                env=env, cwd=worker_dir))
        cluster = StandaloneCluster(master_url, f"http://{LOOPBACK}:{webui_port}", work_dir, processes)
        deadline = time.monotonic() + timeout
        while _alive_workers(cluster) < workers:
            for process in processes[1:]:
                if process.poll() is not None:
                    raise ServiceStartError(f"a worker exited with {process.returncode}:\n"
                                            f"{_tail(work_dir / 'worker-0.log')}")
            if time.monotonic() > deadline:
                raise ServiceStartError(f"{workers} worker(s) not registered after {timeout:.0f}s:\n"
                                        f"{_tail(master_log)}")
            time.sleep(0.5)
        return cluster
    except BaseException:
        _stop(processes)
        raise


def _maven_path(group: str, artifact: str, version: str, classifier: str | None, cache_dir: Path) -> Path:
    name = f"{artifact}-{version}{'-' + classifier if classifier else ''}.jar"
    return cache_dir / group.replace(".", "/") / artifact / version / name


def cached_maven_artifact(group: str, artifact: str, version: str, classifier: str | None = None,
                          cache_dir: Path = MAVEN_CACHE) -> Path:
    """The jar cached by ``scripts/bootstrap``; a clear error if set-up has not fetched it."""
    target = _maven_path(group, artifact, version, classifier, cache_dir)
    if not target.is_file():
        raise ServiceStartError(f"{target.name} is not in {cache_dir}: run ./scripts/bootstrap "
                                "(it fetches test artifacts once; tests never download)")
    return target


def fetch_maven_artifact(group: str, artifact: str, version: str, classifier: str | None = None,
                         cache_dir: Path = MAVEN_CACHE) -> Path:
    """Download one jar from Maven Central into the project cache (once), checked against its SHA-1."""
    target = _maven_path(group, artifact, version, classifier, cache_dir)
    name = target.name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = f"{MAVEN_CENTRAL}/{group.replace('.', '/')}/{artifact}/{version}/{name}"
    with urllib.request.urlopen(url + ".sha1", timeout=60) as response:
        expected = response.read().decode().split()[0].strip()
    partial = target.with_suffix(".part")
    digest = hashlib.sha1()  # noqa: S324 - Maven Central publishes SHA-1 checksums
    with urllib.request.urlopen(url, timeout=600) as response, partial.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected:
        partial.unlink()
        raise ValueError(f"checksum mismatch for {url}: got {digest.hexdigest()}, expected {expected}")
    partial.replace(target)
    return target


@dataclass
class S3Server:
    """A running S3-compatible server on loopback; buckets are folders of ``data_dir``."""

    endpoint: str
    access_key: str
    secret_key: str
    data_dir: Path
    process: subprocess.Popen

    def create_bucket(self, name: str) -> str:
        """Create a bucket (the filesystem backend maps each bucket to a folder) and return its URI."""
        (self.data_dir / name).mkdir(parents=True, exist_ok=True)
        return f"s3a://{name}"

    def stop(self) -> None:
        _stop([self.process])

    def __enter__(self) -> "S3Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_s3proxy(work_dir: Path, access_key: str, secret_key: str, timeout: float = 60) -> S3Server:
    """Start s3proxy on 127.0.0.1 with a filesystem backend under ``work_dir/data`` and signed requests only."""
    if shutil.which("java") is None:
        raise ServiceStartError("java is not on PATH: s3proxy needs a Java 17 runtime")
    jar = cached_maven_artifact(*S3PROXY)
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    properties = work_dir / "s3proxy.properties"
    properties.write_text("\n".join([
        f"s3proxy.endpoint={endpoint}",
        "s3proxy.authorization=aws-v2-or-v4",
        f"s3proxy.identity={access_key}",
        f"s3proxy.credential={secret_key}",
        "jclouds.provider=filesystem",
        f"jclouds.filesystem.basedir={data_dir}",
    ]) + "\n")
    log = work_dir / "s3proxy.log"
    process = subprocess.Popen(["java", "-jar", str(jar), "--properties", str(properties)],
                               stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=work_dir)
    try:
        _wait_for_port(port, process, log, timeout)
    except BaseException:
        _stop([process])
        raise
    return S3Server(endpoint, access_key, secret_key, data_dir, process)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m tests.deployment.cluster fetch")
    print(f"==> s3proxy for the deployment tests: {fetch_maven_artifact(*S3PROXY)}")
