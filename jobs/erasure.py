"""Erasure: a person removed from every table of the lake, physically.

1. :func:`request_erasure` records a pending request in ``ops/erasure_requests``
   with only the keyed patient key (the value ``silver.patient.patient_key``
   holds: HMAC of the establishment's patient reference under that
   establishment's key). The patient reference itself is never stored.
2. :func:`process_erasures` resolves each pending request to its
   ``person_id`` through ``silver.patient``, DELETEs the person from every
   staged and silver table, the quarantine, every project extract (by that
   project's pseudonym) and recomputes gold; then VACUUMs every touched table
   with a retention of 0 hours, so that neither old files nor time travel can
   bring the person back.
3. A receipt per request goes to ``ops/erasure_receipts``: request id, tables
   touched, rows removed per table, table versions after, when. It holds no
   ``person_id`` nor any hash of it: a receipt must not keep the very
   pseudonym the erasure removed (an unkeyed hash of it would still link to
   copies held elsewhere). The request id links the receipt to the request.

A request whose patient is not (yet) in silver stays pending: it is applied
at a later run, once the patient has landed. The request keeps the patient
key after processing so that a steward can check a later re-delivery of the
same patient.

Deleted rows live on in old Parquet files until VACUUM, which is why the
retention check is lifted for exactly the VACUUM call and restored after it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import uuid
from dataclasses import dataclass, field

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, IntegerType, LongType, MapType, StringType, StructField, StructType, TimestampType

from jobs import clock
from jobs.config import Consortium
from jobs.gold import PATIENTS_BY_CONDITION, build_patients_by_condition
from jobs.keys import PseudonymKey
from jobs.lake import Lake, PROJECTS
from jobs.publish import MANIFEST, list_folders, vacuum_now
from jobs.schemas import DATASETS
from jobs.tables import APPEND, purge_deletion_vectors, table_exists

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
])


class ErasureError(Exception):
    """An erasure request cannot be recorded or processed as asked."""


@dataclass(frozen=True)
class ErasureOutcome:
    processed: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    rows_removed: dict[str, int] = field(default_factory=dict)
    vacuumed: tuple[str, ...] = ()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _hex_hmac(key: bytes, message: str) -> str:
    """Same value as :func:`jobs.crypto.hmac_sha256_hex` computes in Spark."""
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


def patient_key_of(key: PseudonymKey, establishment_id: str, patient_ref: str) -> str:
    """The ``silver.patient.patient_key`` of an establishment's patient reference."""
    ref = (patient_ref or "").strip(" ")
    if not ref:
        raise ErasureError("an erasure request needs the patient's reference at the establishment; none given")
    return _hex_hmac(key.establishment_key(establishment_id), f"patient:{ref}")


def request_erasure(spark: SparkSession, lake: Lake, key: PseudonymKey, establishment_id: str,
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


def _delete(spark: SparkSession, path: str, condition) -> int:
    """DELETE matching rows; the number of rows removed."""
    table = DeltaTable.forPath(spark, path)
    before = table.history(1).select("version").first().version
    table.delete(condition)
    last = table.history(1).select("version", "operation", "operationMetrics").first()
    if last.version == before or last.operation != "DELETE":
        return 0
    return int((last.operationMetrics or {}).get("numDeletedRows", 0))


def _person_tables(spark: SparkSession, lake: Lake) -> dict[str, str]:
    """Every table keyed by the consortium ``person_id``: staged, silver, quarantine."""
    tables = {f"staged.{d}": lake.staged(d) for d in DATASETS}
    tables |= {f"silver.{d}": lake.silver(d) for d in DATASETS}
    tables["quarantine.rows"] = lake.quarantine()
    return {name: path for name, path in tables.items() if table_exists(spark, path)}


def _project_tables(spark: SparkSession, lake: Lake) -> dict[tuple[str, str], str]:
    tables = {}
    for project_id in list_folders(spark, lake.zone(PROJECTS)):
        for dataset in list_folders(spark, lake.project(project_id)):
            path = lake.project(project_id, dataset)
            if dataset != MANIFEST and table_exists(spark, path):
                tables[(project_id, dataset)] = path
    return tables


def process_erasures(spark: SparkSession, lake: Lake, consortium: Consortium, key: PseudonymKey) -> ErasureOutcome:
    """Apply every pending erasure request; write one receipt per request processed."""
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

    person_tables = _person_tables(spark, lake)
    project_tables = _project_tables(spark, lake)
    silver_patient = lake.silver("patient")
    done, still_pending, touched = [], [], set()
    receipts_rows: list[dict] = []
    totals: dict[str, int] = {}
    for request in pending:
        persons: list[str] = []
        if table_exists(spark, silver_patient):
            persons = [r.person_id for r in spark.read.format("delta").load(silver_patient)
                       .where((F.col("establishment_id") == request.establishment_id)
                              & (F.col("patient_key") == request.patient_key) & F.col("person_id").isNotNull())
                       .select("person_id").distinct().collect()]
        if not persons:
            still_pending.append(request.request_id)
            continue
        removed: dict[str, int] = {}
        for name, path in person_tables.items():
            removed[name] = _delete(spark, path, F.col("person_id").isin(persons))
        for (project_id, dataset), path in project_tables.items():
            project_key = key.project_key(project_id)
            pseudonyms = [_hex_hmac(project_key, p) for p in persons]
            removed[f"projects.{project_id}.{dataset}"] = _delete(spark, path, F.col("person_id").isin(pseudonyms))
        touched |= {name for name, n in removed.items() if n > 0}
        for name, n in removed.items():
            totals[name] = totals.get(name, 0) + n
        done.append(request.request_id)
        receipts_rows.append({"request_id": request.request_id, "establishment_id": request.establishment_id,
                              "persons_resolved": len(persons), "rows_removed": removed})

    if not done:
        return ErasureOutcome(pending=tuple(still_pending))

    gold_path = lake.gold(PATIENTS_BY_CONDITION)
    all_paths = dict(person_tables) | {f"projects.{p}.{d}": path for (p, d), path in project_tables.items()}
    if table_exists(spark, gold_path):
        as_of = spark.read.format("delta").load(gold_path).select(F.max("as_of").alias("as_of")).first().as_of
        build_patients_by_condition(spark, lake, consortium, as_of or clock.today())
        all_paths[f"gold.{PATIENTS_BY_CONDITION}"] = gold_path
        touched.add(f"gold.{PATIENTS_BY_CONDITION}")
    vacuumed = []
    for name in sorted(touched):
        path = all_paths[name]
        purge_deletion_vectors(spark, path)
        vacuum_now(spark, path)
        vacuumed.append(name)
    versions_after = {name: int(DeltaTable.forPath(spark, all_paths[name]).history(1)
                                .select("version").first().version) for name in vacuumed}

    processed_at = _now()
    receipts = [
        (r["request_id"], r["establishment_id"], r["persons_resolved"], sorted(touched), r["rows_removed"],
         versions_after, key.fingerprint, processed_at)
        for r in receipts_rows
    ]
    spark.createDataFrame(receipts, RECEIPT_SCHEMA).write.format("delta").mode(APPEND).save(
        lake.ops(ERASURE_RECEIPTS))
    DeltaTable.forPath(spark, requests_path).update(
        condition=F.col("request_id").isin(done),
        set={"status": F.lit(STATUS_DONE), "processed_at": F.lit(processed_at)},
    )
    return ErasureOutcome(processed=tuple(done), pending=tuple(still_pending), rows_removed=totals,
                          vacuumed=tuple(vacuumed))
