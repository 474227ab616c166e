"""The lake's writer lock: ordinary writes share it, erasure and VACUUM hold it alone.

Delta's optimistic concurrency lets two ordinary writers (an ingest appending
to bronze, a land MERGE into silver) commit side by side: a conflict fails one
commit, never the table. What it does not cover is a file removed under a
writer's feet: ``VACUUM RETAIN 0`` (erasure, bronze retention) deletes every
file the current version does not reference, including the files a concurrent
MERGE has written and not yet committed, and erasure's log clean-up deletes
commit files. So:

- every stage that writes the lake (ingest, pseudonymise, validate, land,
  publish) holds the lock **shared**;
- erasure, retention purges and compaction hold it **exclusive**: they wait
  until no shared holder is left, and no shared holder starts meanwhile.

The lock is an ``flock`` on a file every writer of a deployment reaches: by
default ``<lake>/_locks/writers.lock`` when the lake is on local disk;
``AFFLUENT_LOCK_DIR`` names a shared folder otherwise (compose sets one on the
Airflow home volume, which every Airflow container mounts). A lake on object
storage with no lock folder set is refused (fail closed) rather than written
unprotected. Airflow's ``affluent_lake_writers`` pool adds the same order at
the scheduler level; this lock also covers the command line.

The lock is re-entrant per thread: an exclusive holder may call code that asks
for it shared. Each holder leaves a line in ``<lock>.holders/`` naming itself,
so that a writer kept waiting says whom it waits for.
"""

from __future__ import annotations

import enum
import functools
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ENV_LOCK_DIR = "AFFLUENT_LOCK_DIR"
ENV_LOCK_TIMEOUT = "AFFLUENT_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 4 * 3600.0
LOCK_FOLDER = "_locks"  # leading underscore: Spark and Delta readers skip it
LOCK_FILE = "writers.lock"
POLL_SECONDS = 0.2
REPORT_EVERY_SECONDS = 60.0

log = logging.getLogger(__name__)


class Mode(enum.Enum):
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


class LakeBusy(RuntimeError):
    """The lock was not obtained within the timeout; the message names who holds it."""


class NoLockFolder(RuntimeError):
    """The lake is on object storage and no lock folder is configured."""


class BatchAlreadyRunning(RuntimeError):
    """Another run of the same batch holds it: this one changes nothing and says so."""

    def __init__(self, establishment_id: str, batch_id: str, what: str, holder: str):
        self.establishment_id, self.batch_id, self.what, self.holder = establishment_id, batch_id, what, holder
        super().__init__(f"{what} of {establishment_id}/{batch_id}: already running ({holder}); this run changed "
                         "nothing. The running one goes on; run it again once it has ended if it fails.")


_held = threading.local()  # per thread: lock path -> the mode its outermost holder took


def lock_path(lake_root: str) -> Path:
    """Where the lake's writer lock lives (``AFFLUENT_LOCK_DIR`` first, else inside a local lake)."""
    configured = os.environ.get(ENV_LOCK_DIR)
    if configured:
        return Path(configured) / LOCK_FILE
    if "://" in lake_root and not lake_root.startswith("file://"):
        raise NoLockFolder(
            f"the lake is at {lake_root}: set {ENV_LOCK_DIR} to a folder every lake writer of this deployment "
            "shares (compose: the Airflow home volume), so that erasure and VACUUM never run during a write")
    root = lake_root.removeprefix("file://")
    return Path(root) / LOCK_FOLDER / LOCK_FILE


def holders(path: Path) -> list[dict]:
    """Who holds (or held, if killed) the lock: one record per holder."""
    folder = path.with_name(path.name + ".holders")
    out = []
    for entry in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(json.loads(entry.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # released meanwhile, or half written
    return out


def _describe(records: list[dict]) -> str:
    if not records:
        return "a writer that left no record"
    return "; ".join(f"{r.get('what')} ({r.get('mode')}, pid {r.get('pid')} on {r.get('host')}, since "
                     f"{r.get('since')})" for r in records)


def _timeout() -> float:
    raw = os.environ.get(ENV_LOCK_TIMEOUT)
    if not raw:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_LOCK_TIMEOUT}={raw!r}: seconds expected") from exc
    if value <= 0:
        raise ValueError(f"{ENV_LOCK_TIMEOUT}={raw!r}: must be positive")
    return value


@contextmanager
def lake_writer(lake_root: str, mode: Mode, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the lake's writer lock in ``mode`` for the duration of the block.

    Waits (logging whom it waits for every minute) up to ``timeout`` seconds
    (``AFFLUENT_LOCK_TIMEOUT``, default 4 hours), then raises :class:`LakeBusy`.
    """
    path = lock_path(lake_root)
    key = str(path)
    table = getattr(_held, "locks", None)
    if table is None:
        table = _held.locks = {}
    held_mode = table.get(key)
    if held_mode is not None:  # this thread holds it already: an inner job runs under the outer one's lock
        if held_mode == Mode.SHARED and mode == Mode.EXCLUSIVE:
            raise RuntimeError(f"{what} asks for the lake's writer lock alone while this thread holds it shared "
                               f"({key}); release it first")
        yield
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    record = None
    try:
        _acquire(fd, path, mode, what, _timeout() if timeout is None else timeout)
        record = _record(path, mode, what)
        table[key] = mode
        try:
            yield
        finally:
            del table[key]
    finally:
        if record is not None:
            record.unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor releases the flock


def _acquire(fd: int, path: Path, mode: Mode, what: str, timeout: float) -> None:
    operation = fcntl.LOCK_EX if mode == Mode.EXCLUSIVE else fcntl.LOCK_SH
    started = time.monotonic()
    reported: float | None = None
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            waited = time.monotonic() - started
            if reported is not None:
                log.info("%s: lake writer lock (%s) obtained after %.0f s", what, mode.value, waited)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now - started >= timeout:
            raise LakeBusy(f"{what}: the lake's writer lock ({path}) is still held after {timeout:.0f} s by "
                           f"{_describe(holders(path))}")
        if reported is None or now - reported >= REPORT_EVERY_SECONDS:
            log.info("%s waits for the lake writer lock (%s) held by %s", what, mode.value, _describe(holders(path)))
            reported = now
        time.sleep(POLL_SECONDS)


def _record(path: Path, mode: Mode, what: str) -> Path:
    folder = path.with_name(path.name + ".holders")
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.json"
    entry.write_text(json.dumps({"what": what, "mode": mode.value, "pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}), encoding="utf-8")
    return entry


def shared(lake_root: str, what: str):
    """The lock as an ordinary writer holds it (many at once)."""
    return lake_writer(lake_root, Mode.SHARED, what)


def exclusive(lake_root: str, what: str):
    """The lock as erasure, retention and VACUUM hold it (alone)."""
    return lake_writer(lake_root, Mode.EXCLUSIVE, what)


def writes_lake(mode: Mode):
    """Decorate a job that takes the :class:`~jobs.core.lake.Lake` it writes as an argument: it runs holding the lock."""
    from jobs.core.lake import Lake

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            lake = next((a for a in (*args, *kwargs.values()) if isinstance(a, Lake)), None)
            if lake is None:
                raise TypeError(f"{fn.__qualname__} writes the lake but was given no Lake")
            with lake_writer(lake.root, mode, f"{fn.__module__}.{fn.__qualname__}"):
                return fn(*args, **kwargs)
        inner.lake_lock_mode = mode
        return inner
    return wrap


# ------------------------------------------------------------ batch runs ----

@contextmanager
def batch_run(lake_root: str, establishment_id: str, batch_id: str, what: str) -> Iterator[None]:
    """Hold one batch for the duration of the block; a second run of it raises :class:`BatchAlreadyRunning`.

    Two runs of one batch (a command while the DAG runs it, two commands)
    would both find it not yet done and both write it: the second commit then
    fails with Delta's ``ConcurrentAppendException``. This ``flock`` lives next
    to the writer lock (``<lock folder>/batches/``); it is not waited for, and
    it is re-entrant per thread (``run`` holds it across its four stages).
    """
    folder = lock_path(lake_root).parent / "batches"
    # The file is named by a digest: batch ids come from the command line and are checked later.
    name = hashlib.sha256(f"{establishment_id}/{batch_id}".encode("utf-8")).hexdigest()[:32]
    path = folder / f"{name}.lock"
    key = str(path)
    table = getattr(_held, "batches", None)
    if table is None:
        table = _held.batches = set()
    if key in table:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    record = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchAlreadyRunning(establishment_id, batch_id, what, _describe(holders(path))) from None
        record = _record(path, Mode.EXCLUSIVE, what)
        table.add(key)
        try:
            yield
        finally:
            table.discard(key)
    finally:
        if record is not None:
            record.unlink(missing_ok=True)
        os.close(fd)
