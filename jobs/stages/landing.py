"""The landing contract: which batches are ready, and whether each can be taken.

A batch is complete once its ``manifest.json`` is there; it is taken only if
every listed file exists inside the batch folder with the announced sha256
and row count. Any failure rejects the whole batch (see docs/landing-contract.md).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.core.batchlog import BatchKind, BatchRejected
from jobs.core.config import NOT_COLLECTED, Consortium, CsvProfile
from jobs.core.lake import file_reference
from jobs.core.schemas import DATASETS

MANIFEST = "manifest.json"
# What the batch log records as the manifest's sha256 when ``manifest.json`` is not a regular file
# (a directory, a link, a pipe) or cannot be read: never a sha256, so any proper manifest differs from it.
MANIFEST_NOT_A_FILE = "not-a-regular-file"
BUNDLE = "bundle"
# NOT_COLLECTED (jobs.core.config): a file of resource types (FHIR) or a CSV file the consortium does not
# collect (a Bulk export's Procedure.ndjson, a Synthea export's claims.csv): checked and counted like
# any file, never read; its rows are "not collected" in the batch log.
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


class ManifestEntryModel(BaseModel):
    """One ``files[]`` entry, strictly typed: ``rows`` is a JSON integer (not ``true``, not ``"12"``)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    # Left out, the profile's ``files`` patterns name it (CSV).
    dataset: str | None = None
    path: str
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    rows: int = Field(ge=0)


class ManifestModel(BaseModel):
    """``manifest.json``, strictly typed (see docs/landing-contract.md)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    establishment: str
    batch_id: str
    extracted_at: str
    kind: str = BatchKind.FULL.value
    files: list[ManifestEntryModel] = Field(min_length=1)


def _manifest_problems(error: ValidationError, batch_id: str) -> tuple[str, str | None]:
    """Every problem of a manifest, ``files[0].rows: …``, and the reference of the file the first one is about."""
    problems, file = [], None
    for problem in error.errors():
        loc = problem["loc"]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        problems.append(f"{where or 'manifest'}: {problem['msg']}")
        if file is None and len(loc) > 1 and loc[0] == "files" and isinstance(loc[1], int):
            file = file_reference(batch_id, loc[1])
    return "; ".join(problems), file


def _path_problem(rel: str) -> str | None:
    """Why a manifest path cannot name a file of the batch folder (``None`` when it can)."""
    if not rel:
        return "is empty"
    bad = next((c for c in rel if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F), None)
    if bad is not None:
        return f"holds the control character U+{ord(bad):04X}"
    if rel.startswith(("/", "\\")) or ".." in Path(rel).parts:
        return "leaves the batch folder"
    return None


def _lone_carriage_return(path: Path) -> int | None:
    """The first line (1-based) holding a CR that does not end it, or ``None``.

    The line readers break lines at CR as well as LF, so a CR inside a field
    would split its record and the counts would no longer match the manifest's.
    """
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            body = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
            if b"\r" in body:
                return number
    return None


def _dataset_by_pattern(est, rel: str) -> tuple[str | None, str | None]:
    """``(dataset, None)`` from the profile's ``files`` patterns for a manifest entry without one, else ``(None, why)``."""
    patterns = getattr(est.input, "files", {}) or {}
    if not patterns:
        return None, "no dataset, and the establishment's profile declares no files patterns to find it"
    name = PurePosixPath(rel).name
    matches = sorted(d for d, globs in patterns.items() if any(fnmatch.fnmatchcase(name, g) for g in globs))
    if len(matches) != 1:
        found = f"several datasets {matches}" if matches else "no dataset"
        return None, (f"no dataset, and the file name matches {found} of the profile's files patterns; "
                      "name the dataset in the manifest or make the patterns distinct")
    return matches[0], None


def check_batch(landing_root: Path, consortium: Consortium, establishment_id: str, batch_id: str) -> Batch:
    """Check one batch against the landing contract; raise :class:`BatchRejected` naming the file at fault."""
    def reject(reason: str, file: str | None = None) -> BatchRejected:
        return BatchRejected(establishment_id, batch_id, reason, file=file)

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
    try:
        mode = manifest_path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise reject(f"no {MANIFEST}: the batch is not complete yet", MANIFEST) from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a link" if stat.S_ISLNK(mode) else "not a regular file"
        raise reject(f"{MANIFEST} is {kind}: the landing contract asks for a regular JSON file. The establishment "
                     "replaces it with the batch's manifest (the batch is then taken again), or a steward skips "
                     "the batch", MANIFEST)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise reject(f"{MANIFEST} is not valid JSON: {exc}", MANIFEST) from None
    except OSError as exc:
        raise reject(f"{MANIFEST} cannot be read: {exc.strerror or exc}", MANIFEST) from None
    if not isinstance(manifest, dict):
        raise reject(f"{MANIFEST} must be a JSON object", MANIFEST)
    try:
        checked = ManifestModel.model_validate(manifest)
    except ValidationError as exc:
        problems, file = _manifest_problems(exc, batch_id)
        raise reject(f"{MANIFEST} does not follow the landing contract: {problems}", file or MANIFEST) from None
    if checked.establishment != establishment_id:
        raise reject(f"manifest names establishment {checked.establishment!r}, folder is {establishment_id!r}",
                     MANIFEST)
    if checked.batch_id != batch_id:
        raise reject(f"manifest names batch {checked.batch_id!r}, folder is {batch_id!r}", MANIFEST)
    if checked.kind not in tuple(BatchKind):
        raise reject(f"kind {checked.kind!r} must be one of {[k.value for k in BatchKind]}", MANIFEST)
    try:
        extracted_at = dt.datetime.fromisoformat(checked.extracted_at.replace("Z", "+00:00"))
    except ValueError:
        raise reject(f"extracted_at {checked.extracted_at!r} is not an ISO-8601 timestamp", MANIFEST) from None
    if extracted_at.tzinfo is None:
        raise reject("extracted_at must carry a time zone (e.g. 2026-01-15T02:00:00Z)", MANIFEST)
    extracted_at = extracted_at.astimezone(dt.timezone.utc).replace(tzinfo=None)

    is_csv = est.input.format == "csv"
    allowed = set(DATASETS) | {NOT_COLLECTED} | ({BUNDLE} if not is_csv else set())
    files: list[ManifestFile] = []
    seen: dict[str, str] = {}
    # Files are named by their place in the manifest and their reference (<batch>#<index>), never by
    # their delivered name: a file name may hold identifiers, and rejections go to ops/batch_log.
    for i, item in enumerate(checked.files):
        where, dataset, rel, ref = f"files[{i}]", item.dataset, item.path, file_reference(batch_id, i)
        if dataset is None:
            dataset, problem = _dataset_by_pattern(est, rel)
            if problem:
                raise reject(f"{where}: {problem}", ref)
        if dataset not in allowed:
            raise reject(f"{where}: unknown dataset {dataset!r} (expected one of {sorted(allowed)})", ref)
        if isinstance(est.input, CsvProfile) and dataset not in est.input.columns and dataset != NOT_COLLECTED:
            raise reject(f"{where}: no column mapping for dataset {dataset!r} in the establishment's profile", ref)
        problem = _path_problem(rel)
        if problem:
            raise reject(f"{where}: its path {problem}", ref)
        path = (folder / rel).resolve()
        if not path.is_relative_to(folder) or path.name == MANIFEST:
            raise reject(f"{where}: its path leaves the batch folder", ref)
        # One file under two spellings (./a.csv, a.csv, a link) would be read twice.
        normalised = path.relative_to(folder).as_posix()
        if normalised in seen:
            raise reject(f"{where}: the file is listed twice (as {seen[normalised]} and {where})", ref)
        seen[normalised] = where
        try:
            if not path.is_file():
                raise reject(f"{where}: the file is missing", ref)
            if _sha256(path) != item.sha256.lower():
                raise reject(f"{where}: the file's sha256 does not match the manifest (file changed or truncated)",
                             ref)
            if dataset != BUNDLE:
                line = _lone_carriage_return(path)
                if line is not None:
                    raise reject(f"{where} ({ref}) line {line} holds a carriage return (CR) that does not end the "
                                 "line; records end in LF or CRLF, and a CR inside a field must be removed or "
                                 "replaced before delivery", ref)
            # A CSV starts with its header even when it has no row, and a Bundle is a JSON object: an empty
            # file is an export that failed, not an empty one, and in a full batch it would delete every record.
            if (is_csv or dataset == BUNDLE) and path.stat().st_size == 0:
                expected = "its header line, even with no row" if is_csv else "a JSON Bundle"
                raise reject(f"{where} ({ref}) is empty (0 bytes): the landing contract asks for {expected}. "
                             "The establishment delivers the file again (or leaves it out of the manifest when "
                             "it has nothing to send); the batch is then taken again", ref)
            counted = _count_rows(path, dataset, has_header=is_csv,
                                  quote=est.input.quote if isinstance(est.input, CsvProfile) else None)
        except OSError as exc:
            raise reject(f"{where}: the file cannot be read: {exc.strerror or 'I/O error'}", ref) from None
        if counted < 0:
            raise reject(f"{where} ({ref}) is not a JSON Bundle (it does not parse as a JSON object)", ref)
        if counted != item.rows:
            raise reject(f"{where}: the file has {counted} rows, the manifest says {item.rows}", ref)
        files.append(ManifestFile(dataset=dataset, path=normalised, sha256=item.sha256, rows=item.rows))
    return Batch(establishment_id, batch_id, folder, extracted_at, BatchKind(checked.kind), tuple(files))
