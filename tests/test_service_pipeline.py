"""The pipeline as a thin client of the Spark service: every stage, publish and an erasure, no JVM here.

Each stage runs on a real Spark Connect client session of a real service
(started as ``affluent spark start`` starts it): Delta's operations travel
as SQL, the keyed functions run in the service with its own key, and the
client process never reads the key (``ServiceKey``: fingerprint and
purposes only).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tests.privacy_helpers import BATCH, EST, hmac_hex, run_batch, write_planted_batch
from tests.test_spark_service import _key, connect  # noqa: F401 - a client of the suite's service

pytestmark = pytest.mark.integration


def test_every_stage_publish_and_an_erasure_run_through_the_service(connect, tmp_path, consortium):
    from pyspark.sql import functions as F

    from jobs.core.arrow_tables import open_delta
    from jobs.core.lake import Lake
    from jobs.core.session import is_connect
    from jobs.privacy.crypto import ServiceKey
    from jobs.privacy.erasure import patient_key_of, process_erasures, request_erasure
    from jobs.stages.publish import publish

    assert is_connect(connect)
    key = ServiceKey(connect)
    expected = _key()
    assert key.fingerprint == expected.fingerprint
    lake = Lake(str(tmp_path / "lake"))
    run_batch(connect, lake, consortium, write_planted_batch(tmp_path / "landing").parent.parent, key)

    silver = connect.read.format("delta").load(lake.silver("patient"))
    victim = patient_key_of(key, EST, "L001")
    assert victim == hmac_hex(expected.establishment_key(EST), "patient:L001")  # the service's HMAC is the key's
    assert silver.where(F.col("patient_key") == victim).count() == 1
    landed = {r.dataset: r.rows_landed for r in connect.read.format("delta").load(lake.ops("batch_log"))
              .where((F.col("stage") == "land") & (F.col("batch_id") == BATCH)).collect()}
    assert landed["patient"] >= 2

    outcome = publish(connect, lake, consortium, key, dt.date(2026, 6, 15))
    assert outcome.key_fingerprint == expected.fingerprint
    with_patients = {p: sizes for p, sizes in outcome.extracts.items() if sizes.get("patient", 0) > 0}
    assert with_patients, outcome.extracts  # the service's keyed functions pseudonymised the extracts
    person_id = silver.where(F.col("patient_key") == victim).first().person_id

    def holding(project: str) -> int:
        pseudonym = hmac_hex(expected.project_key(project), person_id)
        extract = connect.read.format("delta").load(lake.project(project, "patient"))
        return extract.where(F.col("person_id") == pseudonym).count()

    held_by = [p for p in with_patients if holding(p)]
    assert held_by, "the person's project pseudonym is in no extract: the erasure would prove nothing"
    # Every table the service wrote reads with delta-rs too (the gateway's reader): plain types only.
    tables = sorted(log.parent for log in Path(lake.root).rglob("_delta_log"))
    assert any("projects" in str(t) for t in tables) and any("silver" in str(t) for t in tables)
    for table in tables:
        schema = open_delta(str(table)).schema().to_json()
        assert "collate" not in schema, table

    request_erasure(connect, lake, key, EST, "L001")
    erased = process_erasures(connect, lake, consortium, key)
    assert len(erased.processed) == 1 and not erased.pending
    silver = connect.read.format("delta").load(lake.silver("patient"))
    assert silver.where(F.col("patient_key") == victim).count() == 0
    assert silver.count() >= 1  # the others stay
    assert [p for p in held_by if holding(p)] == []  # and the person's project pseudonym left every extract
