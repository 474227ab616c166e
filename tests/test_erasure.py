"""Erasure: the person is gone from every file of the lake and from time travel."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from jobs.privacy.erasure import ERASURE_RECEIPTS, ERASURE_REQUESTS, STATUS_DONE, STATUS_PENDING, patient_key_of
from jobs.core.lake import BRONZE, LANDING
from jobs.stages.pseudonymise import Keyring
from tests.test_publish import C

VICTIM = 5  # seen at C and B, in both projects
VICTIM_REF = "MRN-5"


def strings_in(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings_in(v)


def parquet_strings(root: Path):
    for path in root.rglob("*.parquet"):
        if path.relative_to(root).parts[0] in (LANDING, BRONZE):
            continue
        for row in pq.ParquetFile(path).read().to_pylist():
            for s in strings_in(row):
                yield path, s


@pytest.fixture()
def erased(erased_history):
    return erased_history


def test_patient_key_matches_the_pseudonymisation_stage(spark, pseudonym_key):
    keyring = Keyring.for_establishment(spark, pseudonym_key, C)
    spark_value = spark.range(1).select(keyring.record_id("patient", F.lit(VICTIM_REF)).alias("k")).first().k
    assert patient_key_of(pseudonym_key, C, f" {VICTIM_REF} ") == spark_value


def test_no_data_file_holds_the_person_or_their_pseudonyms(erased):
    assert set(erased["before"]) == {"diabetes_outcomes", "oncology_cohort"}  # they were there before
    forbidden = {erased["victim"], *erased["pseudonyms"].values()}
    files = 0
    for path, value in parquet_strings(erased["root"]):
        files += 1
        assert not any(f in value for f in forbidden), path
    assert files > 0


def test_time_travel_no_longer_returns_the_person(spark, erased):
    lake, victim = erased["lake"], erased["victim"]
    paths = [(lake.silver(d), victim) for d in ("patient", "encounter", "diagnosis", "consent")]
    paths += [(lake.quarantine(), victim),
              (lake.project("diabetes_outcomes", "encounter"), erased["pseudonyms"]["diabetes_outcomes"])]
    for path, who in paths:
        from delta.tables import DeltaTable
        last = DeltaTable.forPath(spark, path).history(1).first().version
        for version in range(last + 1):
            try:
                found = (spark.read.format("delta").option("versionAsOf", version).load(path)
                         .where(F.col("person_id") == who).count())
            except Exception:  # noqa: BLE001 - the version's files are gone: that is the point
                continue
            assert found == 0, (path, version)


def test_receipt_and_request_status(spark, erased):
    lake = erased["lake"]
    receipts = spark.read.format("delta").load(lake.ops(ERASURE_RECEIPTS)).collect()
    assert [r.request_id for r in receipts] == [erased["request_id"]]
    receipt = receipts[0]
    assert receipt.rows_removed["silver.patient"] == 2 and receipt.rows_removed["quarantine.rows"] == 1
    assert receipt.rows_removed["projects.oncology_cohort.patient"] == 1
    assert "gold.patients_by_condition" in receipt.tables_touched
    assert set(receipt.versions_after) == set(receipt.tables_touched)
    requests = {r.request_id: r for r in spark.read.format("delta").load(lake.ops(ERASURE_REQUESTS)).collect()}
    assert requests[erased["request_id"]].status == STATUS_DONE
    assert requests[erased["unknown_id"]].status == STATUS_PENDING  # not landed yet: applied later
    assert erased["outcome"].pending == (erased["unknown_id"],)
    assert not any(VICTIM_REF in s for r in requests.values() for s in strings_in(r.asDict()))
    others = spark.read.format("delta").load(lake.silver("patient")).count()
    assert others == 44  # 46 patient rows, 2 of them the person's
