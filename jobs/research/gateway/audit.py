"""The access audit: append-only, hash-chained, written before any result leaves.

One row per researcher request, allowed or refused, in the Delta table
``ops/access_audit`` (``delta.appendOnly``), written with delta-rs: who (from
the token), which token, project, purpose, the SQL text itself and its
SHA-256, engine, outcome (``allowed``, ``refused``, ``failed``), reason and
rows returned.

Tamper evidence: rows carry a sequence number ``seq``, the ``row_hash`` of the
previous row as ``prev_hash`` and their own ``row_hash`` = SHA-256 of the
canonical JSON of the row (every column but ``row_hash``, ``prev_hash``
included). :func:`verify` recomputes the chain: an altered row breaks its own
hash, a deleted one breaks the next row's ``prev_hash`` and leaves a gap in
``seq``; a Delta commit that is not an append (a DELETE, an overwrite) is
reported. Deleting the newest rows, or rewriting the chain from some row on,
is detected against the last *anchor*: a copy of the head (seq, hash, Delta
version), HMAC-signed, that ``affluent audit anchor`` (a steward, or the daily
maintenance) writes to ``ops/audit_anchors/``, where the gateway cannot write.

Each query leaves a ``requested`` row once it has passed its checks and
before it reads data, then its outcome row: a query killed mid-way leaves
its request.

One writer at a time: the gateway takes an exclusive file lock
(``_writer.lock`` in the audit folder, or in the gateway's private temp folder
for an ``s3a://`` lake, where the gateway is the only writer the bucket policy
allows) around read-last-hash + append. That is enough for the embedded
deployment (one gateway process); several gateway replicas would need a
shared lock or a log store that refuses concurrent commits.

The commit is fsynced (log entry and data file) before the call returns, so
an allowed row is durable before its result is sent.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from jobs.core.arrow_tables import delta_uri
from jobs.research.gateway import ACCESS_AUDIT
from jobs.core.lake import Lake

GENESIS_HASH = "0" * 64
LOCK_FILE = "_writer.lock"

AUDIT_SCHEMA = pa.schema([
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("occurred_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("user", pa.string(), nullable=False),
    pa.field("token_id", pa.string(), nullable=True),
    pa.field("project_id", pa.string(), nullable=False),
    pa.field("purpose", pa.string(), nullable=True),
    pa.field("action", pa.string(), nullable=False),
    pa.field("engine", pa.string(), nullable=False),
    pa.field("sql", pa.string(), nullable=True),
    pa.field("sql_sha256", pa.string(), nullable=True),
    pa.field("outcome", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=True),
    pa.field("rows_returned", pa.int64(), nullable=True),
    pa.field("export_format", pa.string(), nullable=True),
    pa.field("policy_version", pa.string(), nullable=False),
    pa.field("prev_hash", pa.string(), nullable=False),
    pa.field("row_hash", pa.string(), nullable=False),
])
_REQUIRED_TEXT = ("user", "project_id", "action", "engine", "outcome", "policy_version")


class AuditError(RuntimeError):
    """The audit cannot be written or read as a chain; nothing is returned to the researcher."""


def audit_path(lake: Lake) -> str:
    return lake.ops(ACCESS_AUDIT)


def _micros(value: dt.datetime) -> int:
    return int((value - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1))


def row_hash(row: dict) -> str:
    """SHA-256 of the canonical JSON of ``row`` (every column but ``row_hash``)."""
    canonical = {}
    for field in AUDIT_SCHEMA:
        if field.name == "row_hash":
            continue
        value = row.get(field.name)
        canonical[field.name] = _micros(value) if isinstance(value, dt.datetime) else value
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class _Head:
    version: int
    seq: int
    row_hash: str


class AuditWriter:
    """The one writer of ``ops/access_audit`` in this process."""

    def __init__(self, lake: Lake, lock_dir: Path | None = None):
        self.lake = lake
        self.uri = delta_uri(audit_path(lake))
        local = "://" not in self.uri
        if lock_dir is None:
            lock_dir = Path(self.uri) if local else Path(tempfile.gettempdir())
        self.lock_path = Path(lock_dir) / LOCK_FILE
        self._local = local
        self._head: _Head | None = None
        self._thread_lock = threading.Lock()

    @contextmanager
    def _locked(self):
        with self._thread_lock:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.lock_path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def _current_head(self):
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.uri):
            return None, _Head(version=-1, seq=-1, row_hash=GENESIS_HASH)
        table = DeltaTable(self.uri)
        if "row_hash" not in table.schema().to_arrow().names:
            raise AuditError(f"{self.uri} holds an audit without a hash chain; move it aside (it stays readable) "
                             "and start a new chain")
        version = table.version()
        if self._head is not None and self._head.version == version:
            return table, self._head
        rows = table.to_pyarrow_table(columns=["seq", "row_hash"]).to_pylist()
        if not rows:
            return table, _Head(version=version, seq=-1, row_hash=GENESIS_HASH)
        last = max(rows, key=lambda r: r["seq"])
        return table, _Head(version=version, seq=last["seq"], row_hash=last["row_hash"])

    def append(self, event: dict) -> dict:
        """Append ``event`` as the next row of the chain; return the row written (durable on return)."""
        from deltalake import write_deltalake

        missing = [k for k in _REQUIRED_TEXT if not event.get(k)]
        if missing:
            raise AuditError(f"audit event without {', '.join(missing)}")
        with self._locked():
            table, head = self._current_head()
            row: dict = {f.name: event.get(f.name) for f in AUDIT_SCHEMA}
            row["seq"] = head.seq + 1
            row["event_id"] = row["event_id"] or str(uuid.uuid4())
            row["occurred_at"] = row["occurred_at"] or dt.datetime.now(dt.timezone.utc)
            if row["sql"] is not None and not row["sql_sha256"]:
                row["sql_sha256"] = hashlib.sha256(row["sql"].encode("utf-8")).hexdigest()
            row["prev_hash"] = head.row_hash
            row["row_hash"] = row_hash(row)
            data = pa.Table.from_pylist([row], schema=AUDIT_SCHEMA)
            write_deltalake(self.uri, data, mode="append",
                            configuration=None if table is not None else {"delta.appendOnly": "true"})
            version = head.version + 1
            self._sync(version)
            self._head = _Head(version=version, seq=row["seq"], row_hash=row["row_hash"])
            return row

    def _sync(self, version: int) -> None:
        """fsync the commit and the files it adds (S3 PUTs are durable once acknowledged)."""
        if not self._local:
            return
        log = Path(self.uri) / "_delta_log" / f"{version:020d}.json"
        paths = [log]
        if log.exists():
            for line in log.read_text(encoding="utf-8").splitlines():
                add = json.loads(line).get("add")
                if add:
                    paths.append(Path(self.uri) / add["path"])
        for path in [*paths, log.parent, Path(self.uri)]:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


_WRITERS: dict[str, AuditWriter] = {}
_WRITERS_LOCK = threading.Lock()


def writer_for(lake: Lake) -> AuditWriter:
    with _WRITERS_LOCK:
        uri = delta_uri(audit_path(lake))
        if uri not in _WRITERS:
            _WRITERS[uri] = AuditWriter(lake)
        return _WRITERS[uri]


def write_audit(lake: Lake, event: dict) -> dict:
    """Append one event to the audit chain of ``lake``."""
    return writer_for(lake).append(event)


def read_audit(lake: Lake) -> pa.Table:
    """The whole audit, in chain order (for stewards)."""
    from deltalake import DeltaTable

    uri = delta_uri(audit_path(lake))
    if not DeltaTable.is_deltatable(uri):
        return AUDIT_SCHEMA.empty_table()
    return DeltaTable(uri).to_pyarrow_table().sort_by("seq")


@dataclass(frozen=True)
class Verification:
    rows: int
    problems: list[str]
    last_hash: str

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_rows(rows: list[dict]) -> Verification:
    """Recompute the chain over ``rows``: report altered, deleted or reordered rows."""
    problems: list[str] = []
    rows = sorted(rows, key=lambda r: r["seq"])
    expected_prev, expected_seq = GENESIS_HASH, 0
    for row in rows:
        seq = row["seq"]
        if seq != expected_seq:
            if seq > expected_seq:
                problems.append(f"rows seq {expected_seq}..{seq - 1} are missing (deleted)")
            else:
                problems.append(f"seq {seq} appears more than once")
        if row["prev_hash"] != expected_prev:
            problems.append(f"row seq {seq}: prev_hash does not match the row before it (a row was deleted, "
                            "inserted or altered before it)")
        if row_hash(row) != row["row_hash"]:
            problems.append(f"row seq {seq} (event {row['event_id']}): content does not match its row_hash "
                            "(altered)")
        expected_prev, expected_seq = row["row_hash"], max(expected_seq, seq) + 1
    return Verification(rows=len(rows), problems=problems, last_hash=expected_prev)


def _history_problems(uri: str) -> list[str]:
    """Commits of the audit table that are not plain appends (a delete, an overwrite, a compaction)."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(uri):
        return []
    problems = []
    for commit in DeltaTable(uri).history():
        operation = commit.get("operation")
        mode = (commit.get("operationParameters") or {}).get("mode")
        removed = int((commit.get("operationMetrics") or {}).get("num_removed_files") or 0)
        if operation not in ("WRITE", "CREATE TABLE") or (mode and mode != "Append") or removed:
            problems.append(f"version {commit.get('version')} of the audit table is a {operation} "
                            f"{mode or ''} that removed {removed} file(s): the audit was rewritten")
    return problems


# ------------------------------------------------------------ anchors ----
# A signed copy of the chain's head, kept where the gateway cannot write (its
# Landlock rules open only ops/access_audit and ops/privacy_ledger). Written by
# a steward (``affluent audit anchor``) or the daily maintenance; ``verify``
# then detects a truncation or a rewrite of everything up to the last anchor.
AUDIT_ANCHORS = "audit_anchors"
ANCHOR_FILE = "anchors.jsonl"
ENV_ANCHOR_KEY = "AFFLUENT_AUDIT_ANCHOR_KEY"


def anchors_path(lake: Lake) -> Path:
    return Path(lake.ops(AUDIT_ANCHORS)) / ANCHOR_FILE


def _anchor_signature(anchor: dict, key: bytes) -> str:
    import hmac

    body = {k: v for k, v in anchor.items() if k != "signature"}
    return hmac.new(key, json.dumps(body, sort_keys=True).encode("utf-8"), hashlib.sha256).hexdigest()


def _anchor_key() -> bytes | None:
    value = os.environ.get(ENV_ANCHOR_KEY, "")
    return value.encode("utf-8") if value else None


def read_anchors(lake: Lake) -> list[dict]:
    path = anchors_path(lake)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def anchor(lake: Lake, key: bytes | None = None) -> dict:
    """Record the chain's current head (seq, row hash, Delta version), signed with ``key`` when given.

    Raises :class:`AuditError` when the chain is already broken (an anchor must not bless a tampered audit).
    """
    from deltalake import DeltaTable

    if "://" in lake.root:
        raise AuditError("audit anchors are kept in a local ops folder; keep the anchors of a remote lake with a "
                         "steward (the printed head of `affluent audit verify`)")
    key = key if key is not None else _anchor_key()
    result = verify(lake)
    if not result.ok:
        raise AuditError("the audit chain is broken; anchoring refused: " + "; ".join(result.problems[:3]))
    uri = delta_uri(audit_path(lake))
    version = DeltaTable(uri).version() if DeltaTable.is_deltatable(uri) else -1
    head = {"seq": result.rows - 1, "row_hash": result.last_hash, "rows": result.rows, "version": version,
            "at": dt.datetime.now(dt.timezone.utc).isoformat()}
    head["signature"] = _anchor_signature(head, key) if key else None
    path = anchors_path(lake)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(head, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return head


def _anchor_problems(lake: Lake, rows: list[dict], key: bytes | None) -> list[str]:
    problems = []
    by_seq = {r["seq"]: r for r in rows}
    anchors = read_anchors(lake)
    for number, head in enumerate(anchors, start=1):
        if key is not None and head.get("signature") != _anchor_signature(head, key):
            problems.append(f"anchor {number} ({head.get('at')}): signature does not match (the anchor was edited)")
    if anchors:
        last = anchors[-1]
        row = by_seq.get(last["seq"])
        if len(rows) < last["rows"] or row is None:
            problems.append(f"the audit has {len(rows)} row(s) but was anchored at {last['rows']} on {last['at']}: "
                            "rows were removed (truncated)")
        elif row["row_hash"] != last["row_hash"]:
            problems.append(f"row seq {last['seq']} does not match the anchor of {last['at']}: the audit was "
                            "rewritten up to the anchor")
    return problems


def verify(lake: Lake, key: bytes | None = None) -> Verification:
    """Verify the audit chain of ``lake``, its Delta history (appends only) and its last anchor."""
    rows = read_audit(lake).to_pylist()
    result = verify_rows(rows)
    extra = _history_problems(delta_uri(audit_path(lake))) + _anchor_problems(
        lake, rows, key if key is not None else _anchor_key())
    return Verification(rows=result.rows, problems=result.problems + extra, last_hash=result.last_hash)
