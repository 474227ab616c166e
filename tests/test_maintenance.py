import datetime as dt
import json

import pytest
from pyspark.sql import Row

from jobs.core.lake import Lake
from jobs.stages.maintenance import purge_bronze
from jobs.core.schemas import bronze_schema


def _bronze_row(batch: str, ingested: dt.datetime, ref: str) -> Row:
    values = {name: None for name in bronze_schema("patient").fieldNames()}
    values.update(patient_ref=ref, nam="TREM85521201", record_action="upsert", _establishment="chu_laurentides",
                  _batch_id=batch, _source_file="f.csv", _source_line=2, _extracted_at=ingested,
                  _ingested_at=ingested)
    return Row(**values)


def test_bronze_batches_past_retention_are_removed_physically(spark, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    now = dt.datetime(2026, 6, 1)
    rows = [_bronze_row("old", now - dt.timedelta(days=120), "OLD-PATIENT-REF"),
            _bronze_row("new", now - dt.timedelta(days=10), "NEW-PATIENT-REF")]
    spark.createDataFrame(rows, bronze_schema("patient")).write.format("delta").save(lake.bronze("patient"))

    outcome = purge_bronze(spark, lake, retention_days=90, now=now)

    assert outcome["rows_removed"] == {"patient": 1}
    current = [r.patient_ref for r in spark.read.format("delta").load(lake.bronze("patient")).collect()]
    assert current == ["NEW-PATIENT-REF"]
    # Time travel to before the purge cannot bring the old batch back: its files are gone.
    with pytest.raises(Exception):
        spark.read.format("delta").option("versionAsOf", 0).load(lake.bronze("patient")).collect()
    data = b"".join(p.read_bytes() for p in (tmp_path / "lake" / "bronze" / "patient").rglob("*.parquet"))
    assert b"OLD-PATIENT-REF" not in data and b"NEW-PATIENT-REF" in data


def test_a_landed_batch_leaves_every_transient_zone(spark, tmp_path):
    from jobs.core.lake import ZONES
    from jobs.stages.maintenance import purge_transient, zone_tables

    lake = Lake(str(tmp_path / "lake"))
    rows = [("chu_laurentides", "landed", "p1"), ("chu_laurentides", "in-flight", "p2"), ("other", "landed", "p3")]
    for path in (lake.staged("patient"), lake.validated("patient")):
        spark.createDataFrame(rows, "establishment_id string, _batch_id string, person_id string") \
            .write.format("delta").save(path)

    removed = purge_transient(spark, lake, "chu_laurentides", "landed")

    assert removed == {"staged.patient": 1, "validated.patient": 1}
    transient = [name for name, zone in ZONES.items() if zone.transient]
    assert sorted(transient) == ["staged", "validated"]
    for name in transient:
        for path in zone_tables(spark, lake, name).values():
            left = sorted(r.person_id for r in spark.read.format("delta").load(path).collect())
            assert left == ["p2", "p3"]


def test_transient_zones_keep_a_batch_only_while_it_may_still_land(spark, tmp_path):
    """Landed, skipped and long-stopped batches leave staged and validated: rows, files and history."""
    from jobs.core.batchlog import Stage, Status
    from jobs.stages.maintenance import purge_transient_zones
    from jobs.core.ops import append_batch_log
    from jobs.core.tables import DELETION_VECTORS

    lake = Lake(str(tmp_path / "lake"))
    now = dt.datetime(2026, 6, 1)
    ago = lambda days: now - dt.timedelta(days=days)  # noqa: E731
    est = "chu_laurentides"
    log = [("landed", Stage.LAND, Status.LANDED, 1), ("skipped", Stage.VALIDATE, Status.STOPPED, 2),
           ("skipped", Stage.STEWARD, Status.SKIPPED, 1), ("stale", Stage.VALIDATE, Status.STOPPED, 30),
           ("recent", Stage.VALIDATE, Status.STOPPED, 3), ("retried", Stage.STEWARD, Status.SKIPPED, 20),
           ("retried", Stage.STEWARD, Status.RETRY, 1), ("running", Stage.PSEUDONYMISE, Status.PSEUDONYMISED, 0)]
    append_batch_log(spark, lake, [{"establishment_id": est, "batch_id": b, "stage": stage, "status": status,
                                    "recorded_at": ago(days)} for b, stage, status, days in log])
    batches = ["landed", "skipped", "stale", "recent", "retried", "running"]
    rows = [(est, b, f"PERSON-OF-{b.upper()}") for b in batches]
    for path in (lake.staged("patient"), lake.validated("patient")):
        (spark.createDataFrame(rows, "establishment_id string, _batch_id string, person_id string")
         .write.format("delta").option(DELETION_VECTORS, "true").save(path))

    outcome = purge_transient_zones(spark, lake, retention_days=14, now=now)

    assert outcome["stale_batches"] == [f"{est}/stale"]
    assert outcome["rows_removed"] == {"staged.patient": 3, "validated.patient": 3}
    for zone in ("staged", "validated"):
        path = tmp_path / "lake" / zone / "patient"
        kept = sorted(r._batch_id for r in spark.read.format("delta").load(str(path)).collect())
        assert kept == ["recent", "retried", "running"]
        data = b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())
        for gone in ("LANDED", "SKIPPED", "STALE"):  # not in a data file, a commit or a checkpoint
            assert f"PERSON-OF-{gone}".encode() not in data, (zone, gone)
        with pytest.raises(Exception):
            spark.read.format("delta").option("versionAsOf", 0).load(str(path)).collect()


def test_stopped_batches_never_outlive_their_bronze_rows():
    from jobs.core.config import Pipeline

    assert Pipeline().transient_retention_days <= Pipeline().bronze_retention_days
    with pytest.raises(ValueError, match="exceeds bronze_retention_days"):
        Pipeline(bronze_retention_days=7, transient_retention_days=14)


def test_rows_matching_keys_are_deleted_and_a_table_without_them_gets_no_commit(spark, tmp_path):
    from jobs.stages.maintenance import delete_matching, keys_frame
    from jobs.core.tables import table_version

    path = str(tmp_path / "t")
    spark.createDataFrame([("p1", "a"), ("p2", "b"), ("p1", "c")], "person_id string, v string") \
        .write.format("delta").save(path)

    absent = keys_frame(spark, "person_id string", [("p9",)])
    assert delete_matching(spark, path, absent, ["person_id"]) == 0
    assert table_version(spark, path) == 0  # nothing held the key: no MERGE, no commit

    assert delete_matching(spark, path, keys_frame(spark, "person_id string", [("p1",)]), ["person_id"]) == 2
    assert [r.v for r in spark.read.format("delta").load(path).collect()] == ["b"]
    log = (tmp_path / "t" / "_delta_log" / "00000000000000000001.json").read_text().splitlines()
    (info,) = [json.loads(line)["commitInfo"] for line in log if '"commitInfo"' in line]
    # The commit records the condition, never the id.
    assert info["operation"] == "MERGE" and "p1" not in json.dumps(info["operationParameters"])


def test_a_transient_table_whose_files_cannot_hold_the_batch_gets_no_delete(spark, tmp_path):
    """The files' partition values and ``_batch_id`` statistics rule a table out: no DELETE, no commit."""
    from jobs.core.schemas import staged_schema
    from jobs.core.tables import ensure_table, table_version
    from jobs.stages.maintenance import may_hold_batch, purge_transient

    lake = Lake(str(tmp_path / "lake"))
    paths = {}
    for dataset, batch in (("consent", "b2"), ("patient", "b1")):
        paths[dataset] = path = lake.staged(dataset)
        schema = staged_schema(dataset)
        ensure_table(spark, path, schema, partition_by=("establishment_id",))
        row = {f.name: None for f in schema.fields} | {"establishment_id": "chu_laurentides", "_batch_id": batch,
                                                       "record_action": "upsert", "_parse_errors": [],
                                                       "_source_file": f"{batch}#0"}
        spark.createDataFrame([row], schema).write.format("delta").mode("append").save(path)
    assert may_hold_batch(paths["patient"], "chu_laurentides", "b1")
    assert not may_hold_batch(paths["patient"], "chu_laurentides", "b2")
    assert not may_hold_batch(paths["patient"], "other", "b1")
    before = table_version(spark, paths["consent"])

    removed = purge_transient(spark, lake, "chu_laurentides", "b1")

    assert removed == {"staged.consent": 0, "staged.patient": 1}
    assert table_version(spark, paths["consent"]) == before
    assert spark.read.format("delta").load(paths["patient"]).count() == 0


def test_a_batch_leaves_the_transient_tables_the_stages_make_as_whole_files(spark, tmp_path):
    """Staged and validated tables are laid out by establishment and batch: the purge removes the batch's files,
    rewrites nothing and adds no deletion vector, and leaves every other batch's files as they were."""
    from jobs.core.arrow_tables import open_delta
    from jobs.core.lake import TRANSIENT_PARTITIONS
    from jobs.core.schemas import QUARANTINE_SCHEMA, staged_schema
    from jobs.stages.maintenance import may_hold_batch, purge_transient
    from jobs.stages.pseudonymise import _write_staged
    from jobs.stages.validate import validated_path, write_validation

    lake = Lake(str(tmp_path / "lake"))
    schema = staged_schema("consent")

    def batch(est: str, batch_id: str):
        row = {f.name: None for f in schema.fields} | {"establishment_id": est, "_batch_id": batch_id,
                                                       "record_action": "upsert", "_parse_errors": [],
                                                       "_source_file": f"{batch_id}#0", "person_id": f"p-{batch_id}"}
        return spark.createDataFrame([row, row | {"_source_line": 3}], schema)

    batches = [("chu_laurentides", "b1"), ("chu_laurentides", "b2"), ("other", "b1")]
    for est, batch_id in batches:
        assert _write_staged(spark, lake, "consent", batch(est, batch_id), est, batch_id, "fp-test") == 2
        write_validation(spark, lake, est, batch_id, [], spark.createDataFrame([], QUARANTINE_SCHEMA),
                         {"consent": batch(est, batch_id)})
    paths = {"staged.consent": lake.staged("consent"), "validated.consent": validated_path(lake, "consent")}
    kept = {}
    for path in paths.values():
        table = open_delta(path)
        assert table.metadata().partition_columns == list(TRANSIENT_PARTITIONS)
        assert not may_hold_batch(path, "chu_laurentides", "b3")
        kept[path] = {f for f in table.file_uris() if "_batch_id=b2" in f or "establishment_id=other" in f}

    assert purge_transient(spark, lake, "chu_laurentides", "b1") == {name: 2 for name in paths}

    for path in paths.values():
        table = open_delta(path)
        assert set(table.file_uris()) == kept[path]
        (last,) = table.history(1)
        assert last["operation"] == "DELETE"
        metrics = last["operationMetrics"]
        assert int(metrics["numAddedFiles"]) == int(metrics["numDeletionVectorsAdded"]) == 0
        assert int(metrics["numRemovedFiles"]) >= 1
        assert not may_hold_batch(path, "chu_laurentides", "b1")


def test_tables_removed_for_good_side_by_side_keep_only_their_current_version(spark, tmp_path, monkeypatch):
    """Deletion vectors purged, old files vacuumed and history forgotten in every table at once; the
    retention guard is lifted for all of them and restored once, as it was."""
    from jobs.core.tables import DELETION_VECTORS, ENV_TABLE_THREADS, table_version
    from jobs.stages.maintenance import RETENTION_CHECK, remove_for_good

    monkeypatch.setenv(ENV_TABLE_THREADS, "3")
    tables = {}
    for name in ("a", "b", "c"):
        tables[name] = path = str(tmp_path / name)
        spark.createDataFrame([("p1", name), ("p2", name)], "person_id string, v string").coalesce(1) \
            .write.format("delta").option(DELETION_VECTORS, "true").save(path)
        spark.sql(f"DELETE FROM delta.`{path}` WHERE person_id = 'p1'")  # a deletion vector hides p1
    spark.conf.set(RETENTION_CHECK, "true")

    remove_for_good(spark, tables)

    assert spark.conf.get(RETENTION_CHECK) == "true"
    for name, path in tables.items():
        data = sorted(p.name for p in (tmp_path / name).glob("*.parquet"))
        (only,) = data  # the rewritten file: the original, which still held p1, is gone
        held = {r.person_id for r in spark.read.parquet(str(tmp_path / name / only)).collect()}
        assert held == {"p2"}
        assert not list((tmp_path / name).glob("deletion_vector_*"))
        version = table_version(spark, path)
        log = tmp_path / name / "_delta_log"
        oldest = min(int(p.name.split(".")[0]) for p in log.glob("*.json"))
        # History starts at the checkpointed commit that turned the history off, one before the current one.
        assert oldest == version - 1 and list(log.glob(f"{oldest:020d}.checkpoint*.parquet"))
        assert {r.v for r in spark.read.format("delta").load(path).collect()} == {name}
