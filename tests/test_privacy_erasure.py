"""Erasure reaches every zone of jobs.lake.ZONES and leaves no id in files, logs or retained versions."""

from delta.tables import DeltaTable
from pyspark.sql import functions as F

from jobs.erasure import ERASURE_REQUESTS, patient_key_of, process_erasures, request_erasure
from jobs.lake import LANDING, ZONES, Lake
from jobs.maintenance import zone_tables
from tests.conftest import copy_lake
from tests.privacy_helpers import EST, file_text, hmac_hex, lake_files

NAM = "TREM85521201"


def test_an_erased_person_is_gone_from_every_zone(spark, consortium, tmp_path, pseudonym_key, planted_lake):
    root = copy_lake(planted_lake / "lake", tmp_path / "lake")  # staged/ and validated/ still hold the batch
    lake = Lake(str(root))
    patient_key = patient_key_of(pseudonym_key, EST, "L001")
    person_id = (spark.read.format("delta").load(lake.silver("patient"))
                 .where(F.col("patient_key") == patient_key).first().person_id)
    pseudonyms = [hmac_hex(pseudonym_key.project_key(p), person_id) for p in consortium.projects]
    in_clear = [NAM, "Quintalbert"]

    def holding(ids):
        texts = ((p, file_text(p, spark)) for p in lake_files(root, skip_zones=(LANDING,)))
        return sorted({str(p.relative_to(root)).split("/")[0] for p, text in texts if any(i in text for i in ids)})

    before = holding([person_id, patient_key, *pseudonyms, *in_clear])
    assert {"bronze", "staged", "validated", "silver"} <= set(before)  # the scan can find them

    request_erasure(spark, lake, pseudonym_key, EST, "L001")
    outcome = process_erasures(spark, lake, consortium, pseudonym_key)
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
    assert spark.read.format("delta").load(lake.silver("patient")).count() == 2
    assert spark.read.format("delta").load(lake.bronze("patient")).where(F.col("patient_ref") == "L002").count() == 1
