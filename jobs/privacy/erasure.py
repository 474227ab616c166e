"""Erasure: a person removed from every zone of the lake, physically.

1. :func:`request_erasure` records a pending request in ``ops/erasure_requests``
   with only the keyed patient key (the value ``silver.patient.patient_key``
   holds: HMAC of the establishment's patient reference under that
   establishment's key). The patient reference itself is never stored.
2. :func:`process_erasures` resolves each pending request to its
   ``person_id`` through ``silver.patient``, and from it to the person's
   patient keys at every establishment. It then walks :data:`jobs.core.lake.ZONES`
   (so that no zone can be forgotten) and removes the person from each table
   of each zone by what that zone holds: ``person_id`` or ``patient_key``
   (staged, validated, silver, quarantine), the patient reference in clear
   (bronze: each row's reference is keyed in Spark and compared), the
   project pseudonym (every project extract). Gold is recomputed.
3. Rows are removed with ``MERGE … USING <keys> … WHEN MATCHED THEN DELETE``
   whose keys are data, never a literal predicate: Delta's commit log records
   DELETE predicates in clear, which would keep the very ids erased. Only the
   files holding the person are rewritten.
4. Every table of every zone that may hold a person (bronze, staged,
   validated, silver, quarantine, the extracts, and gold once recomputed) is
   then purged of deletion vectors, VACUUMed with a retention of 0 hours and
   its log history forgotten (:func:`forget_history`: a checkpoint of the
   current version, the older commits deleted), whatever this erasure removed
   from it: a retried batch, a transient purge or an earlier MERGE may have left
   the person in files that only an old version names, where a DELETE on the
   current version finds nothing. Neither old files, old log statistics nor
   time travel can bring the person back.
5. The proof (:func:`prove_erased`) reads the contents of every file of every
   table of every zone but landing (Parquet decoded row by row, every commit,
   checksum and checkpoint) for the person's ``person_id``, patient keys and
   project pseudonyms, and keys bronze's references in clear to compare them.
   Min/max statistics are not a proof: an id between a file's min and max is
   invisible to them. A find raises :class:`ErasureIncomplete`: no receipt, and
   the request stays pending. The only find allowed is the request's own
   patient key in ``ops/erasure_requests``.
6. A receipt per request goes to ``ops/erasure_receipts``: request id, tables
   cleaned, rows removed per table, table versions after, the tables, data
   files and log files the proof scanned, how many ids of each kind it
   searched, and that it found none, when. It holds no ``person_id`` nor any
   hash of it: a receipt must not keep the very pseudonym the erasure removed.
   The request id links the receipt to the request.

What remains: landing keeps the delivered files as they came until the
landing retention removes them (a delivered file is evidence and cannot be
rewritten without breaking its checksum), and ``ops/erasure_requests`` keeps
the patient key so that a steward can recognise a later re-delivery.

A request whose patient is not (yet) in silver stays pending: it is applied
at a later run, once the patient has landed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, IntegerType, LongType, MapType, StringType, StructField, StructType, TimestampType

from jobs.core import clock
from jobs.core.config import Consortium
from jobs.stages.gold import PATIENTS_BY_CONDITION, build_patients_by_condition
from jobs.privacy.crypto import ServiceKey
from jobs.privacy.keys import PseudonymKey
from jobs.core.lake import (BRONZE, DIRECT_IDENTIFIERS, GOLD, LANDING, OPS, PATIENT_KEYS, PATIENT_REFERENCES, PERSON_IDS, PROJECTS,
                       ZONES, Lake, Zone)
from jobs.stages.maintenance import (delete_matching, keys_frame, mentions, remove_for_good, table_contents, table_files,
                              zone_tables)
from jobs.core.tables import APPEND, merge_into, on_each_table, table_exists, table_version
from jobs.core.writer_lock import Mode, writes_lake

ERASURE_REQUESTS = "erasure_requests"
ERASURE_RECEIPTS = "erasure_receipts"
STATUS_PENDING = "pending"
STATUS_DONE = "done"

REQUEST_SCHEMA = StructType([
    StructField("request_id", StringType(), False),
    StructField("establishment_id", StringType(), False),
    StructField("patient_key", StringType(), False),
    StructField("key_fingerprint", StringType(), False),
    StructField("status", StringType(), False),
    StructField("requested_at", TimestampType(), False),
    StructField("processed_at", TimestampType(), True),
])

RECEIPT_SCHEMA = StructType([
    StructField("request_id", StringType(), False),
    StructField("establishment_id", StringType(), False),
    StructField("persons_resolved", IntegerType(), False),
    StructField("tables_touched", ArrayType(StringType()), False),
    StructField("rows_removed", MapType(StringType(), LongType()), False),
    StructField("versions_after", MapType(StringType(), LongType()), False),
    StructField("key_fingerprint", StringType(), False),
    StructField("processed_at", TimestampType(), False),
    # The proof: what the content scan read after the erasure, and what it found (nothing, or no receipt).
    StructField("scanned_tables", ArrayType(StringType()), True),
    StructField("scanned_data_files", LongType(), True),
    StructField("scanned_log_files", LongType(), True),
    StructField("ids_searched", MapType(StringType(), LongType()), True),
    StructField("mentions_found", LongType(), True),
])

# What the proof searches for, by kind.
ID_PERSON = "person_id"
ID_PATIENT_KEY = "patient_key"
ID_PROJECT_PSEUDONYM = "project_person_id"
# What the lake keeps of an erased person on purpose: the request itself (its patient key, so that a
# steward can recognise a re-delivery). Anything else the scan finds fails the erasure.
RETAINED = frozenset({(f"{OPS}.{ERASURE_REQUESTS}", ID_PATIENT_KEY)})


class ErasureError(Exception):
    """An erasure request cannot be recorded or processed as asked."""


class ErasureIncomplete(ErasureError):
    """The content scan after an erasure still finds the person: no receipt, the requests stay pending."""


@dataclass(frozen=True)
class ErasureOutcome:
    processed: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    rows_removed: dict[str, int] = field(default_factory=dict)
    vacuumed: tuple[str, ...] = ()
    scanned_tables: tuple[str, ...] = ()
    scanned_data_files: int = 0
    scanned_log_files: int = 0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _hex_hmac(key: bytes, message: str) -> str:
    """Same value as :func:`jobs.privacy.crypto.hmac_sha256_hex` computes in Spark."""
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


def _keyed(key: PseudonymKey | ServiceKey, sub_key, messages: list[str]) -> list[str]:
    """Hex HMACs of ``messages`` under ``sub_key``: here with this process's key, or by the Spark service."""
    if isinstance(key, ServiceKey):
        return key.hmac_hex(sub_key, messages)
    return [_hex_hmac(sub_key, m) for m in messages]


def patient_key_of(key: PseudonymKey | ServiceKey, establishment_id: str, patient_ref: str) -> str:
    """The ``silver.patient.patient_key`` of an establishment's patient reference."""
    ref = (patient_ref or "").strip(" ")
    if not ref:
        raise ErasureError("an erasure request needs the patient's reference at the establishment; none given")
    return _keyed(key, key.establishment_key(establishment_id), [f"patient:{ref}"])[0]


@writes_lake(Mode.SHARED)
def request_erasure(spark: SparkSession, lake: Lake, key: PseudonymKey | ServiceKey, establishment_id: str,
                    patient_ref: str) -> str:
    """Record a pending erasure request (patient key only); return its request id.

    Asking twice for the same patient while a request is pending returns the
    pending request's id.

    Example::

        request_id = request_erasure(spark, lake, load_key(), "chu_laurentides", "MRN-000123")
    """
    patient_key = patient_key_of(key, establishment_id, patient_ref)
    path = lake.ops(ERASURE_REQUESTS)
    if table_exists(spark, path):
        existing = (spark.read.format("delta").load(path)
                    .where((F.col("establishment_id") == establishment_id) & (F.col("patient_key") == patient_key)
                           & (F.col("status") == STATUS_PENDING))
                    .select("request_id").first())
        if existing is not None:
            return existing.request_id
    request_id = str(uuid.uuid4())
    row = (request_id, establishment_id, patient_key, key.fingerprint, STATUS_PENDING, _now(), None)
    spark.createDataFrame([row], REQUEST_SCHEMA).write.format("delta").mode(APPEND).save(path)
    return request_id


@dataclass(frozen=True)
class _Person:
    """What identifies one erased person in each zone, resolved from silver."""

    person_ids: tuple[str, ...]
    patient_keys: tuple[tuple[str, str], ...]  # (establishment_id, patient_key) at every establishment


def _resolve(spark: SparkSession, lake: Lake, establishment_id: str, patient_key: str) -> _Person | None:
    path = lake.silver("patient")
    if not table_exists(spark, path):
        return None
    patients = spark.read.format("delta").load(path)
    persons = [r.person_id for r in patients
               .where((F.col("establishment_id") == establishment_id) & (F.col("patient_key") == patient_key)
                      & F.col("person_id").isNotNull()).select("person_id").distinct().collect()]
    if not persons:
        return None
    same_person = keys_frame(spark, "person_id string", [(p,) for p in persons])
    refs = {(r.establishment_id, r.patient_key) for r in patients.join(same_person, on="person_id", how="left_semi")
            .select("establishment_id", "patient_key").distinct().collect()}
    return _Person(tuple(persons), tuple(sorted(refs | {(establishment_id, patient_key)})))


def _erase_from_zone(spark: SparkSession, lake: Lake, zone: Zone, key: PseudonymKey | ServiceKey, person: _Person
                     ) -> tuple[dict[str, Callable[[], int]], dict[str, str]]:
    """One call per table removing the person's rows (each returns the rows it removed), and the tables' paths."""
    tables = zone_tables(spark, lake, zone.name) if zone.name != LANDING else {}
    person_keys = keys_frame(spark, "person_id string", [(p,) for p in person.person_ids])
    patient_keys = keys_frame(spark, "establishment_id string, patient_key string", list(person.patient_keys))

    def erase(name: str, path: str) -> int:
        columns = set(spark.read.format("delta").load(path).columns)
        n = 0
        if zone.name == PROJECTS:
            pseudonyms = [(p,) for p in _project_pseudonyms(key, name.split(".")[1], person)]
            if "person_id" in columns:
                n += delete_matching(spark, path, keys_frame(spark, "person_id string", pseudonyms), ["person_id"])
        elif PATIENT_REFERENCES in zone.holds and {"_establishment", "patient_ref"} <= columns:
            n += _erase_patient_references(spark, path, key, person)
        else:
            if PERSON_IDS in zone.holds and "person_id" in columns:
                n += delete_matching(spark, path, person_keys, ["person_id"])
            if PATIENT_KEYS in zone.holds and {"establishment_id", "patient_key"} <= columns and zone.name != OPS:
                n += delete_matching(spark, path, patient_keys, ["establishment_id", "patient_key"])
        return n

    return {name: partial(erase, name, path) for name, path in tables.items()}, tables


def _project_pseudonyms(key: PseudonymKey | ServiceKey, project_id: str, person: _Person) -> list[str]:
    return _keyed(key, key.project_key(project_id), list(person.person_ids))


def _erase_patient_references(spark: SparkSession, path: str, key: PseudonymKey | ServiceKey, person: _Person) -> int:
    """Bronze: each row's patient reference keyed in Spark as pseudonymisation does, compared with the person's keys."""
    from jobs.stages.pseudonymise import Keyring

    removed = 0
    bronze = spark.read.format("delta").load(path)
    for establishment_id in sorted({e for e, _ in person.patient_keys}):
        wanted = keys_frame(spark, "patient_key string",
                            [(k,) for e, k in person.patient_keys if e == establishment_id])
        keyring = Keyring.for_establishment(spark, key, establishment_id)
        ref = F.nullif(F.trim(F.col("patient_ref")), F.lit(""))
        rows = (bronze.where(F.col("_establishment") == establishment_id)
                .select("_establishment", "patient_ref", keyring.record_id("patient", ref).alias("patient_key"))
                .join(wanted, on="patient_key", how="left_semi")
                .select("_establishment", "patient_ref").distinct())
        removed += delete_matching(spark, path, rows, ["_establishment", "patient_ref"])
    return removed


@dataclass(frozen=True)
class ContentProof:
    """What the content scan after an erasure read, and what it found (table, kind of id) → rows or lines."""

    tables: tuple[str, ...]
    data_files: int
    log_files: int
    ids_searched: dict[str, int]
    found: dict[tuple[str, str], int]


def _bronze_keyed_references(spark: SparkSession, name: str, path: str, key: PseudonymKey | ServiceKey,
                             establishments: set[str]):
    """Bronze holds references in clear: every data file's references, keyed as pseudonymisation keys them."""
    from jobs.stages.pseudonymise import Keyring

    data, _ = table_files(spark, path)
    if not data or not establishments:
        return None
    rows = spark.read.option("mergeSchema", "true").parquet(*data)
    if "patient_ref" not in rows.columns:
        return None
    if "_establishment" not in rows.columns:
        # A partition column is not in the table's files: its value is in each file's folder name.
        rows = rows.withColumn("_establishment", F.regexp_extract(F.col("_metadata.file_path"),
                                                                  r"/_establishment=([^/]+)/", 1))
    ref = F.nullif(F.trim(F.col("patient_ref")), F.lit(""))
    keyed = F.lit(None).cast("string")
    for establishment_id in sorted(establishments):
        keyring = Keyring.for_establishment(spark, key, establishment_id)
        keyed = F.when(F.col("_establishment") == establishment_id,
                       keyring.record_id("patient", ref)).otherwise(keyed)
    return rows.select(F.lit(name).alias("table"), keyed.alias("value")).where(F.col("value").isNotNull())


def _cleaned(zone: Zone) -> bool:
    """Whether erasure deletes from, rewrites and vacuums the zone's tables (gold: recomputed from silver)."""
    return zone.name == GOLD or (bool(zone.holds - {DIRECT_IDENTIFIERS}) and zone.name not in (OPS, LANDING))


def prove_erased(spark: SparkSession, lake: Lake, key: PseudonymKey | ServiceKey, persons: list[_Person],
                 zones: tuple[str, ...] | None = None) -> ContentProof:
    """Scan the contents of every table of every zone but landing for the persons' ids and keyed references.

    Every Parquet data file on disk is decoded row by row, every commit,
    checksum and checkpoint of every ``_delta_log`` read whole; bronze's
    references in clear are keyed and compared. Landing keeps the files as
    delivered (see the module's docstring). One Spark job for the whole lake;
    ``zones`` narrows it.
    """
    zones = zones or tuple(name for name in ZONES if name != LANDING)
    tables = {name: path for zone in zones for name, path in zone_tables(spark, lake, zone).items()}
    projects = sorted({name.split(".")[1] for name in tables if name.startswith(f"{PROJECTS}.")})
    ids = [(p, ID_PERSON) for person in persons for p in person.person_ids]
    ids += [(k, ID_PATIENT_KEY) for person in persons for _, k in person.patient_keys]
    ids += [(s, ID_PROJECT_PSEUDONYM) for person in persons for project_id in projects
            for s in _project_pseudonyms(key, project_id, person)]
    ids = sorted(set(ids))
    establishments = {e for person in persons for e, _ in person.patient_keys}
    contents, data_files, log_files = None, 0, 0
    for name, path in sorted(tables.items()):
        table = table_contents(spark, name, path)
        data_files += table.data_files
        log_files += table.log_files
        frames = [table.values]
        if name.startswith(f"{BRONZE}."):
            frames.append(_bronze_keyed_references(spark, name, path, key, establishments))
        for frame in frames:
            if frame is not None:
                contents = frame if contents is None else contents.unionByName(frame)
    found: dict[tuple[str, str], int] = {}
    if contents is not None and ids:
        found = {k: n for k, n in mentions(contents, keys_frame(spark, "id string, kind string", ids)).items()
                 if k not in RETAINED}
    searched: dict[str, int] = {}
    for _, kind in ids:
        searched[kind] = searched.get(kind, 0) + 1
    return ContentProof(tuple(sorted(tables)), data_files, log_files, searched, found)


def _refuse_if_found(proof: ContentProof, then: str) -> None:
    if proof.found:
        where = ", ".join(f"{table} ({kind}: {n})" for (table, kind), n in sorted(proof.found.items()))
        raise ErasureIncomplete(
            f"a content scan of {len(proof.tables)} tables finds the person to erase in: {where}, which "
            f"erasure does not clean (or a writer changed outside the lake's lock). {then}; no receipt was "
            "written. Remove the person from those tables, then run the erasure again.")


@writes_lake(Mode.EXCLUSIVE)
def process_erasures(spark: SparkSession, lake: Lake, consortium: Consortium, key: PseudonymKey | ServiceKey) -> ErasureOutcome:
    """Apply every pending erasure request, in every zone; prove it by content; write one receipt per request.

    Every table of every zone that may hold a person is purged of deletion
    vectors, vacuumed and its history dropped, whatever this erasure removed
    from it: a retried batch, a transient purge or an earlier MERGE may have
    left the person in files only an old version names. Then
    :func:`prove_erased` reads every file; a find raises
    :class:`ErasureIncomplete` and no request is marked done.
    """
    requests_path = lake.ops(ERASURE_REQUESTS)
    if not table_exists(spark, requests_path):
        return ErasureOutcome()
    # Pending requests are a small work queue, not data that grows with the lake.
    pending = (spark.read.format("delta").load(requests_path)
               .where(F.col("status") == STATUS_PENDING)
               .select("request_id", "establishment_id", "patient_key", "key_fingerprint").collect())
    if not pending:
        return ErasureOutcome()
    wrong_key = sorted({r.key_fingerprint for r in pending} - {key.fingerprint})
    if wrong_key:
        raise ErasureError(f"pending requests were recorded with key(s) {wrong_key}, not the current key "
                           f"{key.fingerprint}; their patient keys cannot be resolved with it")

    resolved, still_pending = [], []
    for request in pending:
        person = _resolve(spark, lake, request.establishment_id, request.patient_key)
        if person is None:
            still_pending.append(request.request_id)
        else:
            resolved.append((request, person))
    if not resolved:
        return ErasureOutcome(pending=tuple(still_pending))
    persons = [person for _, person in resolved]
    # The zones erasure does not clean must not hold the person: checked before anything is deleted, since
    # the person can no longer be resolved once silver has lost them.
    kept = prove_erased(spark, lake, key, persons, zones=tuple(z.name for z in ZONES.values()
                                                               if z.name != LANDING and not _cleaned(z)))
    _refuse_if_found(kept, "Nothing was deleted")

    done: list[str] = []
    receipts_rows: list[dict] = []
    totals: dict[str, int] = {}
    all_paths: dict[str, str] = {}
    for request, person in resolved:
        erasures: dict[str, Callable[[], int]] = {}
        for zone in ZONES.values():
            if not zone.holds - {DIRECT_IDENTIFIERS}:
                continue
            calls, paths = _erase_from_zone(spark, lake, zone, key, person)
            erasures |= calls
            if _cleaned(zone):
                all_paths |= paths
        # Every table's rows at once (each table is its own MERGE, under the exclusive lock).
        removed = on_each_table(erasures)
        for name, n in removed.items():
            totals[name] = totals.get(name, 0) + n
        done.append(request.request_id)
        receipts_rows.append({"request_id": request.request_id, "establishment_id": request.establishment_id,
                              "persons_resolved": len(person.person_ids), "rows_removed": removed})

    gold_path = lake.gold(PATIENTS_BY_CONDITION)
    if table_exists(spark, gold_path):
        as_of = spark.read.format("delta").load(gold_path).select(F.max("as_of").alias("as_of")).collect()[0].as_of
        build_patients_by_condition(spark, lake, consortium, as_of or clock.today())
        all_paths[f"gold.{PATIENTS_BY_CONDITION}"] = gold_path
    vacuumed = sorted(all_paths)
    remove_for_good(spark, {name: all_paths[name] for name in vacuumed})
    versions_after = {name: table_version(spark, all_paths[name]) for name in vacuumed}

    proof = prove_erased(spark, lake, key, persons)
    _refuse_if_found(proof, "The requests stay pending, but the person can no longer be resolved from silver: "
                            "remove what the scan names by hand")

    processed_at = _now()
    receipts = [
        (r["request_id"], r["establishment_id"], r["persons_resolved"], vacuumed, r["rows_removed"],
         versions_after, key.fingerprint, processed_at, list(proof.tables), proof.data_files, proof.log_files,
         proof.ids_searched, 0)
        for r in receipts_rows
    ]
    # mergeSchema: receipts written before the proof's columns existed gain them.
    spark.createDataFrame(receipts, RECEIPT_SCHEMA).write.format("delta").mode(APPEND).option(
        "mergeSchema", "true").save(lake.ops(ERASURE_RECEIPTS))
    done_ids = keys_frame(spark, "request_id string, processed_at timestamp", [(r, processed_at) for r in done])
    merge_into(spark, requests_path, done_ids, "t.request_id = s.request_id",
               f"WHEN MATCHED AND t.status != '{STATUS_DONE}' "
               f"THEN UPDATE SET status = '{STATUS_DONE}', processed_at = s.processed_at")
    return ErasureOutcome(processed=tuple(done), pending=tuple(still_pending), rows_removed=totals,
                          vacuumed=tuple(vacuumed), scanned_tables=proof.tables,
                          scanned_data_files=proof.data_files, scanned_log_files=proof.log_files)
