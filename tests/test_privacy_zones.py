"""Free text and file names never leave landing and bronze."""

from pyspark.sql import functions as F

from jobs.core.lake import BRONZE, LANDING, Lake
from jobs.stages.pseudonymise import coded_value
from tests.privacy_helpers import (PATIENT_FILE, PLANTED_ADDRESS, PLANTED_FILE_WORD, PLANTED_NAME, file_text,
                                   lake_files)

PLANTED = [PLANTED_ADDRESS, PLANTED_NAME, "Quintalbert", PLANTED_FILE_WORD, PATIENT_FILE, "Zephyrine"]


def test_result_text_is_kept_only_when_typed_or_coded(spark):
    values = ["5,4", "<0.5", ">= 10", "positive", "Not detected", "LA6576-8", "260385009", "2+",
              PLANTED_ADDRESS, PLANTED_NAME, "Tremblay", "514-555-0101", "H2X1Y4", "", None]
    df = spark.createDataFrame([(v,) for v in values], "v string")
    kept = [r.k for r in df.select(coded_value(F.col("v")).alias("k")).collect()]
    assert kept == values[:8] + [None] * 7


def test_no_planted_identifier_outside_landing_and_bronze(spark, planted_lake):
    root = planted_lake / "lake"
    lake = Lake(str(root))

    bronze = spark.read.format("delta").load(lake.bronze("lab_result"))
    assert bronze.where(F.col("value") == PLANTED_ADDRESS).count() == 2  # planted, and kept where it may be
    staged = {r.measurement_id: r for r in spark.read.format("delta").load(lake.staged("lab_result")).collect()}
    assert sorted(r.value_source_value for r in staged.values() if r.value_source_value) == ["5,4", "<0,5", "positive"]
    quarantined = spark.read.format("delta").load(lake.quarantine()).where("dataset = 'lab_result'").collect()
    assert quarantined, "the bad-date row was quarantined"

    scanned = 0
    for path in lake_files(root, skip_zones=(LANDING, BRONZE)):
        text = file_text(path, spark)
        scanned += 1
        for planted in PLANTED:
            assert planted not in text, f"{planted!r} in {path.relative_to(root)}"
    assert scanned > 20
    # The scan can fail: bronze, scanned the same way, holds the planted values.
    bronze_text = "".join(file_text(p, spark) for p in lake_files(root / BRONZE))
    assert PLANTED_ADDRESS in bronze_text
