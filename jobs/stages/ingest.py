"""Landing → bronze: take a complete batch, parse every file, keep lineage, lose nothing.

Per file: ``rows in the manifest = entries in bronze + rows quarantined +
entries not collected``, checked after writing; a batch whose manifest does
not hold (missing file, checksum, row count, unknown dataset) is rejected
whole before anything is written.

An entry (a CSV record, an NDJSON line, a Bundle entry) is one manifest row.
It lands as one bronze row, except a FHIR Observation with components, which
lands one row per component (:mod:`jobs.readers.fhir`): bronze entries are
therefore counted as the distinct ``(_source_file, _source_line)`` of the
batch's bronze rows. A FHIR resource of a type the consortium does not
collect is neither in bronze nor quarantined: the reader counts it.

The batch log gets one ``ingested`` entry per dataset: ``rows_read`` = bronze
rows + rows quarantined (what land reconciles, ``read = landed + quarantined
+ duplicates``) and ``rows_not_collected``, the entries not collected from
the files the manifest lists under that dataset (``bundle`` for a Bundle,
``resource`` for a single resource, ``not_collected`` for a whole file of
resources not collected or a CSV file the profile lists under ``files:
not_collected``, which is counted and never read beyond its header; the
``not_collected`` entry's message gives each such file's count), so that per
batch::

    rows in the manifest = Σ rows_read + Σ rows_not_collected - component rows

where the component rows (rows beyond the first of an entry) are named in the
entry's message when there are any.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import partial, reduce
from pathlib import Path
from typing import Any, Callable

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.core.config import Consortium, CsvProfile
from jobs.core.lake import Lake, file_reference
from jobs.core.batchlog import BatchKind, BatchRejected, Stage, Status
from jobs.stages.batch_queue import delivered_manifest, redelivery_conflict
from jobs.stages.landing import BUNDLE, MANIFEST, NOT_COLLECTED, Batch, check_batch
from jobs.core.ops import append_batch_log, batches_with_status
from jobs.readers.csv import FileLineage, HeaderError, header_drift, read_csv_file, read_header
from jobs.core.schemas import QUARANTINE_SCHEMA, bronze_schema
from jobs.core.tables import cast_to, each_outcome, on_each_table, ready_table, replace_rows
from jobs.core.writer_lock import Mode, writes_lake

STAGE = Stage.INGEST


class IngestReconciliationError(Exception):
    """Rows read from a file do not add up to what the manifest announced."""


@dataclass(frozen=True)
class IngestOutcome:
    establishment_id: str
    batch_id: str
    kind: str = ""
    bronze: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    skipped: bool = False
    # Entries not collected in the batch (per dataset in the batch log's ``rows_not_collected``).
    not_collected: int = 0


def _read_file(spark, path: Path, dataset: str, est, lineage: FileLineage, max_field_bytes: int):
    if isinstance(est.input, CsvProfile):
        return read_csv_file(spark, path, dataset, est.input, lineage, max_field_bytes)
    from jobs.readers.fhir import read_fhir_file

    return read_fhir_file(spark, str(path), dataset, est.input, lineage)


def _read_bundles(spark, sources: dict[str, str], est, lineage: FileLineage):
    """Every FHIR Bundle file of a batch in one read: one plan, whatever the number of Bundles."""
    from jobs.readers.fhir import read_fhir_bundles

    return read_fhir_bundles(spark, sources, est.input, lineage)


class _FileRefused(Exception):
    """A file of the batch stops it (its position in the manifest and why)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index, self.message = index, message


def header_changes(batch: Batch, profile: CsvProfile, consortium: Consortium, establishment_id: str) -> dict[str, str]:
    """Per dataset, how a CSV batch's headers drift from the profile's mapping (when its rules allow it).

    Raises :class:`_FileRefused` for a header that cannot be read or that drifts where the batch rules
    do not allow it. Reads the first lines of the files only, from Python.
    """
    changes: dict[str, str] = {}
    for index, entry in enumerate(batch.files):
        reference = file_reference(batch.batch_id, index)
        try:
            header = read_header(batch.file_path(entry), profile, reference)
        except HeaderError as exc:
            raise _FileRefused(index, str(exc)) from None
        if entry.dataset == NOT_COLLECTED:
            continue  # no mapping to drift from: its header is decoded, its records only counted
        mapping = profile.expected_headers(entry.dataset)
        change = header_drift(header, mapping)
        if change and not consortium.batch_rules(establishment_id, entry.dataset).allow_column_changes:
            raise _FileRefused(index, (
                f"{reference}: the source header differs from the profile's {entry.dataset} mapping "
                f"({change}); header {header}, profile expects {list(mapping)}. Nothing was ingested: "
                f"update config/establishments/{establishment_id}.yaml or ask the establishment to restore "
                "its export (batch_rules.allow_column_changes lets drifted files land, with the missing "
                "columns NULL)."))
        if change:
            changes[entry.dataset] = change
    return changes


@writes_lake(Mode.SHARED)
def ingest_batch(spark: SparkSession, lake: Lake, landing_root: Path, consortium: Consortium,
                 establishment_id: str, batch_id: str) -> IngestOutcome:
    """Ingest one batch into bronze; a batch already ingested is skipped.

    Every refusal is in the batch log with its file, its reason and the
    manifest's sha256 (a batch whose manifest changes is checked again, see
    :mod:`jobs.stages.batch_queue`). A batch delivered again with another manifest
    after it was ingested is refused as a ``conflict``: the first delivery stays.
    """
    manifest = delivered_manifest(landing_root, consortium, establishment_id, batch_id)
    conflict = redelivery_conflict(lake, landing_root, consortium, establishment_id, batch_id)
    if conflict:
        reason = (f"delivered again after ingest with another {MANIFEST} (sha256 {conflict}); the first "
                  "delivery stays. Deliver changes as a new batch; `affluent batch skip` or `affluent batch "
                  "retry` (goes on with the first delivery) once the establishment has explained.")
        append_batch_log(spark, lake, [{"establishment_id": establishment_id, "batch_id": batch_id,
                                        "stage": STAGE, "status": Status.CONFLICT, "message": reason,
                                        "manifest_sha256": conflict, "source_file": MANIFEST}])
        raise BatchRejected(establishment_id, batch_id, reason, file=MANIFEST)
    if batch_id in batches_with_status(lake, establishment_id, STAGE, Status.INGESTED):
        return IngestOutcome(establishment_id, batch_id, skipped=True)
    try:
        batch = check_batch(landing_root, consortium, establishment_id, batch_id)
    except BatchRejected as exc:
        append_batch_log(spark, lake, [{"establishment_id": establishment_id, "batch_id": batch_id,
                                        "stage": STAGE, "status": Status.REJECTED, "message": exc.reason,
                                        "source_file": exc.file, "manifest_sha256": manifest}])
        raise

    est = consortium.establishment(establishment_id)
    ingested_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    bronze_parts: dict[str, list[DataFrame]] = {}
    empty: set[str] = set()  # datasets of files that held no record
    column_changes: dict[str, str] = {}
    quarantine_parts: list[DataFrame] = []
    notes: dict[str, list[str]] = {}
    not_collected: dict[str, int] = {}
    not_collected_files: dict[str, int] = {}
    not_collected_types: dict[str, dict[str, int]] = {}
    whole_files_not_collected: dict[str, int] = {}
    # Free-text parts left out of entries that landed: an Observation component's valueString (FHIR),
    # an observation's word answer outside the profile's closed list (CSV).
    free_text_dropped: dict[str, int] = {}

    def reject(index: int, message: str) -> BatchRejected:
        """A file of the batch stops it: logged under the file's reference, never its delivered name."""
        append_batch_log(spark, lake, [{"establishment_id": establishment_id, "batch_id": batch_id,
                                        "dataset": batch.files[index].dataset, "stage": STAGE,
                                        "status": Status.REJECTED, "message": message,
                                        "source_file": file_reference(batch_id, index), "manifest_sha256": manifest}])
        return BatchRejected(establishment_id, batch_id, message, file=file_reference(batch_id, index))

    if isinstance(est.input, CsvProfile):
        # Every header is checked before any file is read, so a drifted file stops the batch whole.
        try:
            column_changes = header_changes(batch, est.input, consortium, establishment_id)
        except _FileRefused as refused:
            raise reject(refused.index, refused.message) from None
    # A batch's Bundles are read all at once: a plan per Bundle, unioned, would grow with their number
    # and take longer to plan than to run. Path → the file's reference (its lineage).
    bundles = {str(batch.file_path(entry)): file_reference(batch_id, index)
               for index, entry in enumerate(batch.files) if entry.dataset == BUNDLE}
    # The files are read side by side (each read is a few Spark round trips: they overlap), then taken
    # in the manifest's order: the first file that fails stops the batch, as if they were read one by one.
    reads: dict[int, Callable[[], Any]] = {}
    for index, entry in enumerate(batch.files):
        lineage = FileLineage(establishment_id, batch_id, file_reference(batch_id, index),
                              batch.extracted_at, ingested_at)
        if entry.dataset == NOT_COLLECTED:
            # A whole file of resources not collected: checked and counted by the landing checks, never read.
            not_collected_files[lineage.source_file] = entry.rows
            whole_files_not_collected[lineage.source_file] = entry.rows
            not_collected[entry.dataset] = not_collected.get(entry.dataset, 0) + entry.rows
        elif entry.dataset == BUNDLE:
            if lineage.source_file == next(iter(bundles.values())):
                reads[index] = partial(_read_bundles, spark, bundles, est, lineage)  # every Bundle at once
        else:
            reads[index] = partial(_read_file, spark, batch.file_path(entry), entry.dataset, est, lineage,
                                   consortium.pipeline.max_field_bytes)
    outcomes = each_outcome(reads)
    # The readers' cached parses, released at the end whatever happens (a failed read left none).
    results = [o for o in outcomes.values() if not isinstance(o, Exception)]
    try:
        for index, result in outcomes.items():
            entry = batch.files[index]
            if isinstance(result, HeaderError) and entry.dataset != BUNDLE:
                raise reject(index, str(result)) from None
            if isinstance(result, Exception):
                raise result
            notes.setdefault(entry.dataset, []).extend(getattr(result, "notes", ()))
            file_reads = getattr(result, "file_reads", None)
            for source, counted in (file_reads() if file_reads else {}).items():
                if counted.free_text_dropped:
                    free_text_dropped[entry.dataset] = free_text_dropped.get(entry.dataset, 0) + counted.free_text_dropped
                if counted.not_collected:
                    not_collected_files[source] = not_collected_files.get(source, 0) + counted.not_collected
                    not_collected[entry.dataset] = not_collected.get(entry.dataset, 0) + counted.not_collected
                    types = not_collected_types.setdefault(entry.dataset, {})
                    for rtype, n in counted.not_collected_types.items():
                        types[rtype] = types.get(rtype, 0) + n
            dropped_answers = getattr(result, "free_text_dropped", None)
            if dropped_answers is not None:
                # CSV: observation answers outside the profile's closed list, dropped from rows that landed.
                n = dropped_answers()
                if n:
                    free_text_dropped["observation"] = free_text_dropped.get("observation", 0) + n
            if not getattr(result, "holds_records", True):
                # A file found empty before Spark read it: nothing to write or count (a batch's content is
                # fixed by its manifest, so no earlier attempt wrote rows of it either); 0 rows read below.
                empty.update(result.bronze)
                continue
            for dataset, frame in result.bronze.items():
                bronze_parts.setdefault(dataset, []).append(frame)
            quarantine_parts.append(result.quarantine)

        # One commit per table, the tables written side by side (jobs.core.tables.on_each_table).
        writes: dict[str, Callable[[], None]] = {
            dataset: partial(write_bronze, spark, lake, dataset, reduce(DataFrame.unionByName, frames),
                             establishment_id, batch_id)
            for dataset, frames in bronze_parts.items()}
        # Written even when every file was empty: it replaces the rows an earlier attempt may have left.
        quarantine = (reduce(DataFrame.unionByName, quarantine_parts) if quarantine_parts
                      else spark.createDataFrame([], QUARANTINE_SCHEMA))
        writes["quarantine"] = partial(write_ingest_quarantine, spark, lake, quarantine, establishment_id, batch_id)
        on_each_table(writes)
        # What the tables now hold of the batch, counted once over all of them (one Spark job).
        # Every dataset read is counted, an empty file's too (its batch-log entry says 0 rows read).
        bronze_counts: dict[str, int] = dict.fromkeys([*empty, *bronze_parts], 0)
        bronze_entries: dict[str, int] = dict.fromkeys([*empty, *bronze_parts], 0)
        quarantined: dict[str, int] = {}
        per_file: dict[str, int] = dict(not_collected_files)
        for r in batch_counts(spark, lake, list(bronze_parts), establishment_id, batch_id):
            if r["zone"] == "bronze":
                bronze_counts[r["dataset"]] = bronze_counts.get(r["dataset"], 0) + r["rows"]
                bronze_entries[r["dataset"]] = bronze_entries.get(r["dataset"], 0) + r["entries"]
            else:
                quarantined[r["dataset"]] = quarantined.get(r["dataset"], 0) + r["rows"]
            per_file[r["source_file"]] = per_file.get(r["source_file"], 0) + r["entries"]
    finally:
        # The readers' cached parses, released even when a write or a count fails.
        for result in results:
            result.unpersist()

    for index, entry in enumerate(batch.files):
        source = file_reference(batch_id, index)
        if per_file.get(source, 0) != entry.rows:
            reason = (f"{source}: the manifest announces {entry.rows} rows, {per_file.get(source, 0)} were read "
                      "(entries landed in bronze + quarantined + not collected). Nothing was logged as ingested; "
                      "inspect the file, then `affluent batch retry` or `affluent batch skip`.")
            append_batch_log(spark, lake, [{"establishment_id": establishment_id, "batch_id": batch_id,
                                            "dataset": entry.dataset, "stage": STAGE, "status": Status.STOPPED,
                                            "message": reason, "source_file": source,
                                            "manifest_sha256": manifest}])
            raise IngestReconciliationError(reason)

    def figures(d: str) -> list[str]:
        """What the typed counts of dataset ``d`` do not say: component rows, types not collected."""
        said = []
        extra = bronze_counts.get(d, 0) - bronze_entries.get(d, 0)
        if extra:
            said.append(f"{bronze_counts[d]} rows in bronze from {bronze_entries[d]} entries ({extra} more rows "
                        "from Observation components)")
        if not_collected.get(d):
            types = ", ".join(f"{t} {n}" for t, n in sorted(not_collected_types.get(d, {}).items()))
            said.append(f"{not_collected[d]} entries not collected" + (f" ({types})" if types else ""))
        if free_text_dropped.get(d):
            said.append(f"{free_text_dropped[d]} free-text part(s) dropped from entries that landed (an "
                        "Observation component's or value's valueString, an answer outside the profile's "
                        "observations.answers)")
        if d == NOT_COLLECTED and whole_files_not_collected:
            # Per file, by its manifest reference (a delivered name may hold identifiers).
            files = sorted(whole_files_not_collected.items(), key=lambda item: _file_index(item[0]))
            said.append("files not collected, never read: " + ", ".join(f"{ref} {n} rows" for ref, n in files))
        return said

    datasets = sorted(set(bronze_counts) | set(quarantined) | set(not_collected))
    append_batch_log(spark, lake, [
        {"establishment_id": establishment_id, "batch_id": batch_id, "dataset": d, "stage": STAGE,
         "status": Status.INGESTED, "rows_read": bronze_counts.get(d, 0) + quarantined.get(d, 0),
         "rows_quarantined": quarantined.get(d, 0), "rows_not_collected": not_collected.get(d, 0),
         "extracted_at": batch.extracted_at, "kind": batch.kind, "manifest_sha256": manifest,
         "message": "; ".join(([f"columns: {column_changes[d]}"] if d in column_changes else [])
                             + notes.get(d, []) + figures(d)) or None}
        for d in datasets
    ])
    return IngestOutcome(establishment_id, batch_id, batch.kind.value, bronze_counts, quarantined,
                         not_collected=sum(not_collected.values()))


BRONZE_COMMENT = "Bronze {dataset}: parsed, still identifying. Pipeline only; purged after retention."
QUARANTINE_COMMENT = "Rejected rows (no identifier) with the stage, rule and reason that rejected them."


def write_bronze(spark: SparkSession, lake: Lake, dataset: str, frame: DataFrame, establishment_id: str,
                 batch_id: str) -> None:
    """Replace the batch's rows of a bronze table with ``frame``: one commit per table and batch."""
    path = lake.bronze(dataset)
    ready_table(spark, path, bronze_schema(dataset), partition_by=("_establishment", "_batch_id"),
                comment=BRONZE_COMMENT.format(dataset=dataset))
    replace_rows(frame, path, {"_establishment": establishment_id, "_batch_id": batch_id})


def write_ingest_quarantine(spark: SparkSession, lake: Lake, quarantine: DataFrame, establishment_id: str,
                            batch_id: str) -> None:
    """Replace the batch's ingest rows of the quarantine table (one commit)."""
    qpath = lake.quarantine()
    ready_table(spark, qpath, QUARANTINE_SCHEMA, partition_by=("establishment_id",), comment=QUARANTINE_COMMENT)
    replace_rows(quarantine.select([cast_to(F.col(f.name), f.dataType) for f in QUARANTINE_SCHEMA.fields]), qpath,
                 {"establishment_id": establishment_id, "batch_id": batch_id, "stage": STAGE})


def batch_counts(spark: SparkSession, lake: Lake, datasets: list[str], establishment_id: str,
                 batch_id: str) -> list:
    """Rows and entries of the batch per zone (``bronze``, ``quarantine``), dataset and source file, as written.

    Read back from the tables (what reconciles is what they hold), all of them in one query. An entry
    may land several bronze rows (an Observation's components): entries are the distinct source lines;
    a quarantined row is one entry.
    """
    def bronze(dataset: str) -> DataFrame:
        return (spark.read.format("delta").load(lake.bronze(dataset))
                .where((F.col("_establishment") == establishment_id) & (F.col("_batch_id") == batch_id))
                .select(F.lit("bronze").alias("zone"), F.lit(dataset).alias("dataset"),
                        F.col("_source_file").alias("source_file"), F.col("_source_line").cast("long").alias("line")))

    quarantine = (spark.read.format("delta").load(lake.quarantine())
                  .where((F.col("establishment_id") == establishment_id) & (F.col("batch_id") == batch_id)
                         & (F.col("stage") == STAGE))
                  # A quarantined row counts as its own entry whatever its line (null-safe: a line may be unknown).
                  .select(F.lit("quarantine").alias("zone"), "dataset", "source_file",
                          F.monotonically_increasing_id().alias("line")))
    rows = reduce(DataFrame.unionByName, [bronze(d) for d in datasets] + [quarantine])
    return (rows.groupBy("zone", "dataset", "source_file")
            .agg(F.count(F.lit(1)).alias("rows"), F.count_distinct("line").alias("entries")).collect())


def _file_index(reference: str) -> int:
    """The manifest position of a file reference ``<batch>#<index>``, to list files in delivery order."""
    return int(reference.rsplit("#", 1)[1])


def batch_kind(lake: Lake, establishment_id: str, batch_id: str) -> BatchKind:
    """``full`` or ``incremental``, as the manifest said when the batch was ingested (batch log, via delta-rs)."""
    from jobs.stages.batch_queue import ingested_entries

    kinds = [e["kind"] for e in ingested_entries(lake, establishment_id, batch_id).values()]
    if not kinds:
        raise LookupError(f"batch {establishment_id}/{batch_id} has not been ingested")
    return BatchKind(kinds[0])
