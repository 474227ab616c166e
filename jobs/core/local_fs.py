"""Hadoop's local file system without a process started per call (``jvm/ForklessLocalFileSystem.java``).

Hadoop, without its native library, starts a ``readlink`` process before each
rename and a ``chmod`` process for each permission it sets on local disk: about
1,600 processes forked from the driver's JVM for one small batch through the
four stages and a publish. A Spark session whose executors share the driver's
JVM (a ``local`` master: the embedded default, the Spark service, the tests)
uses this project's subclass for ``file:`` paths instead, which answers both
calls with ``java.nio``. Set ``AFFLUENT_LOCAL_FS=hadoop`` to keep Hadoop's own.

A cluster's executors run in JVMs of their own, without this jar: a session
with another master keeps Hadoop's file system.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from jobs.core.java import compile_jar, jar_for

log = logging.getLogger(__name__)

JAVA_SOURCE = Path(__file__).resolve().parent / "jvm" / "ForklessLocalFileSystem.java"
FILE_SYSTEM_CLASS = "affluent.fs.ForklessLocalFileSystem"
FILE_CONTEXT_CLASS = "affluent.fs.ForklessLocalFileSystem$Fs"
ENV_LOCAL_FS = "AFFLUENT_LOCAL_FS"


def local_fs_conf(master: str) -> dict[str, str]:
    """The settings that make a session started with ``master`` use the forkless local file system.

    Empty for a master that is not ``local`` (executors elsewhere), when
    ``AFFLUENT_LOCAL_FS=hadoop``, or when the jar cannot be built (no ``javac``):
    the file system is then Hadoop's own, which gives the same answers, slower.
    """
    if not master.startswith("local") or os.environ.get(ENV_LOCAL_FS, "").strip().lower() == "hadoop":
        return {}
    try:
        jar = compile_jar(JAVA_SOURCE, jar_for(JAVA_SOURCE, "affluent-local-fs"))
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning("Hadoop's own local file system kept: %s could not be compiled (%s)", JAVA_SOURCE.name, exc)
        return {}
    return {
        # On the driver's class path from its start: Hadoop loads file systems with the JVM's class loader.
        "spark.driver.extraClassPath": str(jar),
        "spark.hadoop.fs.file.impl": FILE_SYSTEM_CLASS,
        "spark.hadoop.fs.AbstractFileSystem.file.impl": FILE_CONTEXT_CLASS,
    }
