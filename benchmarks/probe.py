"""What a benchmark measures besides wall time: peak memory and where Spark spent it.

- :class:`MemorySampler` samples the resident memory of this Python process
  and of the driver JVM (its ``java`` child) from a background thread, so a
  stage's peak is seen even when it lasts a fraction of a second.
- :func:`spark_jobs_by_group` reads Spark's event log after the session
  stopped: per job group (one per measured stage), the Spark jobs, their
  summed duration and the call sites that took longest. The gap between a
  stage's wall time and its Spark jobs' time is driver work (planning, Delta
  log replays, commits, Python).
- :func:`delta_versions` reads the latest version of every Delta table under
  the lake's root from its log's file names, and :func:`delta_commits` the
  commits made between two such readings: a batch's Delta commit count,
  every table of every zone, whichever process made them.
- :func:`code_version` names the commit the figures were measured at.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MIB = 1024 * 1024


@dataclass
class Peak:
    python_mb: float = 0.0
    jvm_mb: float = 0.0
    total_mb: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"python_mb": round(self.python_mb), "jvm_mb": round(self.jvm_mb), "total_mb": round(self.total_mb)}


class MemorySampler:
    """Resident memory of the Python driver and the driver JVM, sampled every ``interval`` seconds.

    Example::

        with MemorySampler() as memory:
            memory.reset()
            run_stage()
            print(memory.peak.as_dict())
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = Peak()
        self.overall = Peak()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._me = psutil.Process()

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        """Start a new peak (the overall peak keeps running)."""
        with self._lock:
            self.peak = Peak()
        self.sample()

    def _jvm_rss(self) -> int:
        total = 0
        for child in self._me.children(recursive=True):
            try:
                if child.name().startswith("java"):
                    total += child.memory_info().rss
            except psutil.Error:
                continue  # a child that exited between listing and reading holds no memory
        return total

    def sample(self) -> None:
        python = self._me.memory_info().rss / MIB
        jvm = self._jvm_rss() / MIB
        with self._lock:
            for peak in (self.peak, self.overall):
                peak.python_mb = max(peak.python_mb, python)
                peak.jvm_mb = max(peak.jvm_mb, jvm)
                peak.total_mb = max(peak.total_mb, python + jvm)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


@dataclass
class GroupProfile:
    jobs: int = 0
    seconds: float = 0.0
    call_sites: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self, top: int = 5) -> dict:
        ranked = sorted(self.call_sites.items(), key=lambda item: -sum(item[1]))[:top]
        return {"spark_jobs": self.jobs, "spark_job_seconds": round(self.seconds, 2),
                "top_call_sites": [{"call_site": site, "jobs": len(d), "seconds": round(sum(d), 2)}
                                   for site, d in ranked]}


def _event_log_files(folder: Path) -> list[Path]:
    """The newest application's event log: one file, or the parts of a rolling log (``eventlog_v2_*``)."""
    logs = sorted(folder.glob("*"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return []
    newest = logs[-1]
    if newest.is_file():
        return [newest]
    parts = [p for p in newest.glob("events_*") if p.is_file()]
    return sorted(parts, key=lambda p: int(p.name.split("_")[1]))


def spark_jobs_by_group(folder: Path, top: int = 5) -> dict[str, dict]:
    """Per Spark job group: number of jobs, their summed duration, and the longest call sites.

    Reads the newest event log in ``folder`` (``spark.eventLog.dir``); the
    session must have stopped so that the log is complete.
    """
    started: dict[int, tuple[str, str, int]] = {}
    groups: dict[str, GroupProfile] = {}
    for path in _event_log_files(folder):
        with path.open(encoding="utf-8") as handle:
            _read_jobs(handle, started, groups)
    return {group: profile.as_dict(top) for group, profile in sorted(groups.items())}


def _read_jobs(handle, started: dict[int, tuple[str, str, int]], groups: dict[str, GroupProfile]) -> None:
    for line in handle:
        if '"SparkListenerJob' not in line[:40]:
            continue
        event = json.loads(line)
        if event["Event"] == "SparkListenerJobStart":
            props = event.get("Properties") or {}
            site = props.get("callSite.short") or (event.get("Stage Infos") or [{}])[0].get("Stage Name", "?")
            started[event["Job ID"]] = (props.get("spark.jobGroup.id") or "(none)", site, event["Submission Time"])
        elif event["Event"] == "SparkListenerJobEnd" and event["Job ID"] in started:
            group, site, submitted = started.pop(event["Job ID"])
            seconds = (event["Completion Time"] - submitted) / 1000
            profile = groups.setdefault(group, GroupProfile())
            profile.jobs += 1
            profile.seconds += seconds
            profile.call_sites.setdefault(site, []).append(seconds)


class Clock:
    """Seconds since creation, for progress lines."""

    def __init__(self):
        self.started = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.started


# A commit's log entry (``_delta_log/00000000000000000012.json``); checkpoints and checksums are not commits.
_COMMIT_FILE = re.compile(r"^(\d{20})\.json$")


def delta_versions(root: Path) -> dict[str, int]:
    """The latest committed version of every Delta table under ``root``, by its path relative to ``root``.

    Read from the names in each ``_delta_log`` folder (no Spark, no log
    replay), so it is cheap enough to take before and after every step. The
    highest commit file stays when old log entries are cleaned up after a
    checkpoint, so differences of versions count commits even then.
    """
    versions: dict[str, int] = {}
    for folder, subfolders, files in os.walk(root):
        if os.path.basename(folder) != "_delta_log":
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            continue
        subfolders[:] = []
        found = [int(m.group(1)) for m in map(_COMMIT_FILE.match, files) if m]
        if found:
            versions[os.path.relpath(os.path.dirname(folder), root)] = max(found)
    return versions


def delta_commits(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commits per table between two :func:`delta_versions` readings (a table created in between counts from 0)."""
    made = {table: version - before.get(table, -1) for table, version in after.items()}
    return {table: n for table, n in sorted(made.items()) if n > 0}


def commits_by_zone(commits: dict[str, int]) -> dict[str, int]:
    """Commits per zone of the lake (the first folder of each table's path)."""
    zones: dict[str, int] = {}
    for table, n in commits.items():
        zone = Path(table).parts[0]
        zones[zone] = zones.get(zone, 0) + n
    return zones


def code_version(project: Path) -> dict[str, object]:
    """The commit measured and whether the work tree had changes on top of it (then the figures are not its)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or None, "short": commit[:10] or None, "dirty": bool(changes) if commit else None}
