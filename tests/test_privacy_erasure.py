"""Erasure reaches every zone of jobs.lake.ZONES and leaves no id in files, logs or retained versions."""

from delta.tables import DeltaTable

from jobs.erasure import ERASURE_REQUESTS
from jobs.lake import LANDING, ZONES
from jobs.maintenance import zone_tables
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
