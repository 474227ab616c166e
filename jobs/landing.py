"""The landing contract: which batches are ready, and whether each can be taken.

A batch is complete once its ``manifest.json`` is there; it is taken only if
every listed file exists inside the batch folder with the announced sha256
and row count. Any failure rejects the whole batch (see docs/landing-contract.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from jobs.batchlog import BatchKind, BatchRejected
from jobs.config import Consortium
from jobs.schemas import DATASETS

MANIFEST = "manifest.json"
BUNDLE = "bundle"
BATCH_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

__all__ = ["BatchRejected", "Batch", "ManifestFile", "check_batch", "ready_batches"]


@dataclass(frozen=True)
class ManifestFile:
    dataset: str
    path: str
    sha256: str
    rows: int


@dataclass(frozen=True)
class Batch:
    """A checked batch, ready to ingest."""

    establishment_id: str
    batch_id: str
    folder: Path
    extracted_at: dt.datetime
    kind: BatchKind
    files: tuple[ManifestFile, ...]

    def file_path(self, entry: ManifestFile) -> Path:
        return self.folder / entry.path


def ready_batches(landing_root: Path, establishment_folder: str) -> list[str]:
    """Batch ids whose manifest is present, in delivery order."""
    folder = landing_root / establishment_folder
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / MANIFEST).is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _count_rows(path: Path, dataset: str, has_header: bool, quote: str | None = None) -> int:
    """Records of a file: a JSON Bundle's entries, a CSV's non-blank records, an NDJSON's lines.

    With ``quote``, a line ending inside a quoted field continues its record (a
    note with line breaks is one row), as the CSV reader counts it.
    """
    if dataset == BUNDLE:
        try:
            return len(json.loads(path.read_bytes()).get("entry") or [])
        except (ValueError, AttributeError):
            return -1
    mark = quote.encode("ascii") if quote else None
    records, in_quote, has_text = 0, False, False
    with path.open("rb") as handle:
        for line in handle:
            has_text = has_text or bool(line.strip())
            if mark and line.count(mark) % 2:
                in_quote = not in_quote
            if not in_quote:
                records += has_text
                has_text = False
    records += has_text
    return records - 1 if has_header else records


def check_batch(landing_root: Path, consortium: Consortium, establishment_id: str, batch_id: str) -> Batch:
    """Check one batch against the landing contract; raise :class:`BatchRejected`."""
    def reject(reason: str) -> BatchRejected:
        return BatchRejected(establishment_id, batch_id, reason)

    if establishment_id not in consortium.establishments:
        raise reject(f"unknown establishment {establishment_id!r}: declare it under config/establishments/")
    est = consortium.establishments[establishment_id]
    if not BATCH_ID_PATTERN.match(batch_id):
        raise reject(f"batch id {batch_id!r} does not match {BATCH_ID_PATTERN.pattern}")
    base = (landing_root / est.landing_folder).resolve()
    folder = (base / batch_id).resolve()
    if not folder.is_relative_to(base):
        raise reject("batch folder leaves the establishment's landing folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise reject(f"no {MANIFEST}: the batch is not complete yet")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise reject(f"{MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise reject(f"{MANIFEST} must be a JSON object")
    if manifest.get("establishment") != establishment_id:
        raise reject(f"manifest names establishment {manifest.get('establishment')!r}, folder is {establishment_id!r}")
    if manifest.get("batch_id") != batch_id:
        raise reject(f"manifest names batch {manifest.get('batch_id')!r}, folder is {batch_id!r}")
    kind = manifest.get("kind", BatchKind.FULL.value)
    if kind not in tuple(BatchKind):
        raise reject(f"kind {kind!r} must be one of {[k.value for k in BatchKind]}")
    try:
        extracted_at = dt.datetime.fromisoformat(str(manifest.get("extracted_at")).replace("Z", "+00:00"))
    except ValueError:
        raise reject(f"extracted_at {manifest.get('extracted_at')!r} is not an ISO-8601 timestamp") from None
    if extracted_at.tzinfo is None:
        raise reject("extracted_at must carry a time zone (e.g. 2026-01-15T02:00:00Z)")
    extracted_at = extracted_at.astimezone(dt.timezone.utc).replace(tzinfo=None)

    is_csv = est.input.format == "csv"
    allowed = set(DATASETS) | ({BUNDLE} if not is_csv else set())
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        raise reject("manifest lists no files")
    files: list[ManifestFile] = []
    seen: set[str] = set()
    for i, item in enumerate(entries):
        where = f"files[{i}]"
        if not isinstance(item, dict):
            raise reject(f"{where} must be an object")
        dataset, rel = item.get("dataset"), item.get("path")
        if dataset not in allowed:
            raise reject(f"{where}: unknown dataset {dataset!r} (expected one of {sorted(allowed)})")
        if is_csv and dataset not in est.input.columns:
            raise reject(f"{where}: no column mapping for dataset {dataset!r} in the establishment's profile")
        if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
            raise reject(f"{where}: path {rel!r} leaves the batch folder")
        path = (folder / rel).resolve()
        if not path.is_relative_to(folder) or path.name == MANIFEST:
            raise reject(f"{where}: path {rel!r} leaves the batch folder")
        if rel in seen:
            raise reject(f"{where}: {rel} is listed twice")
        seen.add(rel)
        if not path.is_file():
            raise reject(f"{where}: file {rel} is missing")
        if _sha256(path) != str(item.get("sha256", "")).lower():
            raise reject(f"{where}: sha256 of {rel} does not match the manifest (file changed or truncated)")
        rows = item.get("rows")
        if not isinstance(rows, int) or rows < 0:
            raise reject(f"{where}: rows must be a non-negative integer")
        counted = _count_rows(path, dataset, has_header=is_csv, quote=est.input.quote if is_csv else None)
        if counted != rows:
            raise reject(f"{where}: {rel} has {counted} rows, the manifest says {rows}")
        files.append(ManifestFile(dataset=dataset, path=rel, sha256=item["sha256"], rows=rows))
    return Batch(establishment_id, batch_id, folder, extracted_at, BatchKind(kind), tuple(files))
