"""Java sources of the project compiled, once, into jars of the ignored cache.

A jar is named by its source's digest, so a changed source gives a new jar and an
unchanged one is never compiled again. Compiled against PySpark's own jars
(Spark, Hadoop) with the JDK's ``javac``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path


def jar_for(source: Path, name: str) -> Path:
    """Where ``source`` compiled goes: ``.cache/spark-udf/<name>-<digest>.jar``."""
    from jobs.core.settings import Settings

    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    return Settings.from_env().jars_cache.parent / "spark-udf" / f"{name}-{digest}.jar"


def compile_jar(source: Path, jar: Path) -> Path:
    """Compile ``source`` against PySpark's jars into ``jar`` unless it is there; ``jar``."""
    if jar.is_file():
        return jar
    import pyspark

    # Per process: two processes compiling the same jar at once each finish their own, then one replaces.
    classes = jar.parent / f"{jar.stem}-classes-{os.getpid()}"
    classes.mkdir(parents=True, exist_ok=True)
    spark_jars = Path(pyspark.__file__).parent / "jars" / "*"
    subprocess.run(["javac", "--release", "17", "-nowarn", "-cp", str(spark_jars), "-d", str(classes),
                    str(source)], check=True, capture_output=True, text=True)
    partial = jar.with_name(f"{jar.stem}.{os.getpid()}.tmp")
    subprocess.run(["jar", "cf", str(partial), "-C", str(classes), "."], check=True, capture_output=True, text=True)
    partial.replace(jar)
    shutil.rmtree(classes, ignore_errors=True)
    return jar
