"""Erasure reaches every zone of jobs.core.lake.ZONES and leaves no id in files, logs or retained versions."""

import shutil

import pytest
from delta.tables import DeltaTable
from pyspark.sql import functions as F

from jobs.privacy.erasure import ERASURE_RECEIPTS, ERASURE_REQUESTS
from jobs.core.lake import LANDING, ZONES
from jobs.stages.maintenance import zone_tables
from tests.privacy_helpers import file_text, lake_files

NAM = "TREM85521201"


def test_an_erased_person_is_gone_from_every_zone(spark, erased_during_land):
    """On the planted lake, L001 erased (while a second batch, L004 only, landed): no trace in any zone."""
    run = erased_during_land
    lake, root = run["lake"], run["root"]
    person_id, patient_key, pseudonyms, in_clear = (run["person_id"], run["patient_key"], run["pseudonyms"],
                                                    run["in_clear"])
    assert not run["errors"], run["errors"]
    assert {"bronze", "staged", "validated", "silver"} <= set(run["holding_before"])  # the scan can find them

    outcome = run["outcomes"]["erasure"]
    assert outcome.processed and outcome.rows_removed["bronze.patient"] == 1
    assert outcome.rows_removed["validated.lab_result"] > 0 and outcome.rows_removed["staged.encounter"] == 1

    requests = lake.ops(ERASURE_REQUESTS)
    for path in lake_files(root, skip_zones=(LANDING,)):
        text = file_text(path, spark)
        forbidden = [person_id, *pseudonyms, *in_clear] + ([] if str(path).startswith(requests) else [patient_key])
        for value in forbidden:
            assert value not in text, f"{value} in {path.relative_to(root)}"
    for name, zone in ZONES.items():
        for table, path in zone_tables(spark, lake, name).items():
            history = DeltaTable.forPath(spark, path).history().select("version").collect()
            for row in history:
                rows = spark.read.format("delta").option("versionAsOf", row.version).load(path)
                text = "".join(str(r) for r in rows.collect())
                assert person_id not in text and NAM not in text, (table, row.version)
    # Others stay: L002 is still in silver and bronze.
    refs = {r.patient_ref for r in spark.read.format("delta").load(lake.bronze("patient")).collect()}
    assert "L002" in refs and "L001" not in refs
    assert spark.read.format("delta").load(lake.silver("patient")).count() == 3  # L002, L003, and L004 landed since


# ------------------------------------------------------------- proof by content ----

def _rows_text(spark, path, version=None) -> str:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return "".join(str(r) for r in reader.load(path).collect())


@pytest.fixture(scope="module")
def erased_everywhere(spark, consortium, planted_lake, tmp_path_factory):
    """L001 in every zone, in the current version and only in old files, then erased.

    The planted batch is retried (its staged and validated files replaced) and
    then purged from the transient zones, so that its rows stay only in files an
    old version names (a DELETE on the current version finds nothing there);
    a second batch holding L001 stops before land, so that staged and validated
    hold the person now. A first erasure meets the person in a table it does
    not clean and must fail loudly; once that table is gone, the second succeeds.
    """
    from jobs.privacy.erasure import ErasureIncomplete, patient_key_of, process_erasures, request_erasure
    from jobs.stages.ingest import ingest_batch
    from jobs.privacy.keys import load_key
    from jobs.core.lake import Lake
    from jobs.stages.maintenance import purge_transient
    from jobs.stages.pseudonymise import pseudonymise_batch
    from jobs.stages.validate import validate_batch
    from tests.conftest import TEST_KEY, copy_lake
    from tests.landing_helpers import LAURENTIDES_ENCOUNTER_HEADER, LAURENTIDES_PATIENT_HEADER, latin1_csv, write_batch
    from tests.privacy_helpers import BATCH, EST, hmac_hex, write_planted_batch

    key = load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)
    tmp = tmp_path_factory.mktemp("erased-everywhere")
    root = copy_lake(planted_lake / "lake", tmp / "lake")
    lake = Lake(str(root))
    landing = tmp / "landing"
    write_planted_batch(landing)
    pseudonymise_batch(spark, lake, consortium, key, EST, BATCH)  # a retry: the files are replaced
    validate_batch(spark, lake, consortium, EST, BATCH, "full")
    purge_transient(spark, lake, EST, BATCH)  # landed: gone from the current version, not from the files
    stopped = "20260112-002"
    write_batch(landing, EST, stopped, {
        "patients.csv": ("patient", latin1_csv(LAURENTIDES_PATIENT_HEADER, [
            "L001;TREM85521201;Quintalbert;Zéphyrine;12/02/1985;F;;Montréal;H2X 1Y4;;;;A"])),
        "sejours.csv": ("encounter", latin1_csv(LAURENTIDES_ENCOUNTER_HEADER, [
            "S9;L001;10/01/2026 08:00;;urgence;Urgence;;A"]))},
        extracted_at="2026-01-12T02:00:00Z", kind="incremental")
    kind = ingest_batch(spark, lake, landing, consortium, EST, stopped).kind
    pseudonymise_batch(spark, lake, consortium, key, EST, stopped)
    validate_batch(spark, lake, consortium, EST, stopped, kind)  # and never landed

    patient_key = patient_key_of(key, EST, "L001")
    person_id = (spark.read.format("delta").load(lake.silver("patient"))
                 .where(F.col("patient_key") == patient_key).first().person_id)
    pseudonyms = [hmac_hex(key.project_key(p), person_id) for p in consortium.projects]
    current = {table: person_id in _rows_text(spark, path) for zone in ("staged", "validated")
               for table, path in zone_tables(spark, lake, zone).items()}
    old_only = person_id not in _rows_text(spark, lake.validated("lab_result"))  # the planted labs: old files only

    request_id = request_erasure(spark, lake, key, EST, "L001")
    # A table no erasure cleans, holding the person: the proof must find it and refuse.
    spark.createDataFrame([(person_id, 1)], "who string, n int").write.format("delta").save(lake.ops("stray"))
    with pytest.raises(ErasureIncomplete) as refused:
        process_erasures(spark, lake, consortium, key)
    still_pending = (spark.read.format("delta").load(lake.ops(ERASURE_REQUESTS))
                     .where(F.col("request_id") == request_id).first().status)
    shutil.rmtree(root / "ops" / "stray")
    outcome = process_erasures(spark, lake, consortium, key)
    return {"lake": lake, "root": root, "person_id": person_id, "patient_key": patient_key,
            "pseudonyms": pseudonyms, "current": current, "old_only": old_only, "refused": str(refused.value),
            "still_pending": still_pending, "outcome": outcome, "request_id": request_id}


def test_erasure_proved_by_content_in_every_zone_and_version(spark, erased_everywhere):
    run = erased_everywhere
    lake, root, person_id, patient_key = run["lake"], run["root"], run["person_id"], run["patient_key"]
    # The person was where the erasure has to reach: now in the stopped batch, in old files only for the planted one.
    assert run["current"]["staged.patient"] and run["current"]["validated.encounter"]
    assert run["old_only"]
    outcome = run["outcome"]
    assert outcome.rows_removed["staged.patient"] == 1 and outcome.rows_removed["validated.encounter"] == 1
    assert outcome.rows_removed["validated.lab_result"] == 0  # nothing in the current version, files cleaned all the same
    assert {"validated.lab_result", "staged.lab_result", "silver.patient"} <= set(outcome.vacuumed)

    # Every file, commit and checkpoint, decoded: nothing of the person outside landing (and the request's key).
    requests = lake.ops(ERASURE_REQUESTS)
    files = lake_files(root, skip_zones=(LANDING,))
    assert any("/_delta_log/" in str(p) and p.suffix == ".parquet" for p in files)  # checkpoints are scanned too
    for path in files:
        text = file_text(path, spark)
        forbidden = [person_id, NAM, *run["pseudonyms"]] + ([] if str(path).startswith(requests) else [patient_key])
        for value in forbidden:
            assert value not in text, f"{value} in {path.relative_to(root)}"
    # Time travel: every version any table still knows returns nothing of them.
    for name in ZONES:
        for table, path in zone_tables(spark, lake, name).items():
            for row in DeltaTable.forPath(spark, path).history().select("version").collect():
                text = _rows_text(spark, path, row.version)
                assert person_id not in text and NAM not in text, (table, row.version)
                assert table == "ops.erasure_requests" or patient_key not in text, (table, row.version)


def test_the_receipt_records_the_proof(spark, erased_everywhere):
    run = erased_everywhere
    receipt = (spark.read.format("delta").load(run["lake"].ops(ERASURE_RECEIPTS))
               .where(F.col("request_id") == run["request_id"]).first())
    assert receipt.mentions_found == 0
    assert {"bronze.patient", "staged.patient", "validated.lab_result", "silver.patient", "quarantine.rows",
            "ops.batch_log"} <= set(receipt.scanned_tables)
    assert not any(t.startswith("landing") for t in receipt.scanned_tables)
    assert receipt.scanned_data_files > 0 and receipt.scanned_log_files > 0
    assert receipt.ids_searched["person_id"] == 1 and receipt.ids_searched["patient_key"] == 1
    assert receipt.ids_searched["project_person_id"] >= 1
    assert run["person_id"] not in str(receipt.asDict())


def test_a_person_left_in_a_table_erasure_does_not_clean_fails_the_erasure(erased_everywhere):
    run = erased_everywhere
    assert "ops.stray (person_id: 1)" in run["refused"] and run["person_id"] not in run["refused"]
    assert run["still_pending"] == "pending"


def test_content_scan_finds_an_id_the_statistics_do_not_show(spark, tmp_path):
    """Min/max statistics name only a file's extremes; the scan decodes every row, of old files too."""
    from jobs.stages.maintenance import keys_frame, mentions, table_contents

    path = str(tmp_path / "t")
    spark.createDataFrame([("aaa",), ("middle-id-42",), ("zzz",)], "person_id string").coalesce(1).write.format(
        "delta").save(path)
    log = "".join(p.read_text() for p in (tmp_path / "t" / "_delta_log").glob("*.json"))
    assert "middle-id-42" not in log  # invisible to the statistics
    ids = keys_frame(spark, "id string, kind string", [("middle-id-42", "person_id")])
    assert mentions(table_contents(spark, "t", path).values, ids) == {("t", "person_id"): 1}
    spark.createDataFrame([("other",)], "person_id string").write.format("delta").mode("overwrite").save(path)
    contents = table_contents(spark, "t", path)  # the old file is no longer in the current version
    assert contents.data_files >= 2 and contents.log_files >= 2
    assert mentions(contents.values, ids) == {("t", "person_id"): 1}


def test_content_scan_reads_partition_folders_and_change_data(spark, tmp_path):
    """Rows in files under partition folders (``_batch_id=…``) and in the change data feed's ``_change_data/``
    are rows all the same: the scan reads them."""
    from jobs.stages.maintenance import keys_frame, mentions, table_contents

    path = str(tmp_path / "t")
    (spark.createDataFrame([("b1", "in-a-partition-folder"), ("b2", "kept")], "_batch_id string, person_id string")
     .write.format("delta").partitionBy("_batch_id").option("delta.enableChangeDataFeed", "true")
     .option("delta.dataSkippingNumIndexedCols", "0").save(path))  # no statistics: the ids only in data files
    spark.sql(f"UPDATE delta.`{path}` SET person_id = 'changed' WHERE _batch_id = 'b2'")
    assert list((tmp_path / "t" / "_change_data").rglob("*.parquet"))  # the update's copy of the old row
    spark.sql(f"DELETE FROM delta.`{path}` WHERE _batch_id = 'b1'")
    ids = keys_frame(spark, "id string, kind string", [("in-a-partition-folder", "person_id"), ("kept", "person_id")])
    # Both only in files no current version names: one in a partition folder, one in the change data as well.
    assert mentions(table_contents(spark, "t", path).values, ids) == {("t", "person_id"): 3}


def test_the_proof_keys_the_references_of_a_bronze_table_laid_out_by_batch(spark, tmp_path, pseudonym_key):
    """Bronze's patient references are in clear, and its files sit in ``_establishment=…/_batch_id=…`` folders:
    the proof keys each file's references with its folder's establishment and finds the erased person's."""
    import datetime as dt

    from pyspark.sql import Row

    from jobs.core.lake import Lake
    from jobs.core.schemas import bronze_schema
    from jobs.privacy.erasure import _Person, prove_erased
    from jobs.stages.ingest import write_bronze
    from jobs.stages.pseudonymise import Keyring

    lake = Lake(str(tmp_path / "lake"))
    values = dict.fromkeys(bronze_schema("patient").fieldNames()) | dict(
        record_action="upsert", _establishment="chu_laurentides", _batch_id="b1", _source_file="b1#0",
        _source_line=2, _extracted_at=dt.datetime(2026, 6, 1), _ingested_at=dt.datetime(2026, 6, 1))
    rows = [Row(**(values | {"patient_ref": ref})) for ref in ("L001", "L002")]
    write_bronze(spark, lake, "patient", spark.createDataFrame(rows, bronze_schema("patient")), "chu_laurentides", "b1")
    keyring = Keyring.for_establishment(spark, pseudonym_key, "chu_laurentides")
    (keyed,) = spark.range(1).select(keyring.record_id("patient", F.lit("L001")).alias("k")).first()

    proof = prove_erased(spark, lake, pseudonym_key, [_Person((), (("chu_laurentides", keyed),))], zones=("bronze",))

    assert proof.found == {("bronze.patient", "patient_key"): 1}
