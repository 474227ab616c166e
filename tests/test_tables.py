"""Delta tables keep statistics of ids, dates and numbers only: no text of a coded field in a commit log."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from jobs.core.schemas import staged_schema
from jobs.core.tables import STATS_COLUMNS, ensure_table, stats_columns, table_properties

NAME = "Éloïse Tremblay, 12 rue des Érables"


def test_a_name_in_a_coded_field_never_reaches_the_statistics_of_a_commit_log(spark, tmp_path):
    path = str(tmp_path / "staged" / "encounter")
    schema = staged_schema("encounter")
    ensure_table(spark, path, schema, partition_by=("establishment_id",))
    assert table_properties(spark, path)[STATS_COLUMNS] == ",".join(stats_columns(schema, ("establishment_id",)))
    row = {f.name: None for f in schema.fields} | {
        "visit_occurrence_id": "v-key-1", "person_id": "p-pseudonym-1", "establishment_id": "chu_laurentides",
        "visit_start_date": dt.date(2026, 1, 2), "visit_source_value": "Jean Gagnon",
        "care_site_source_value": NAME, "record_action": "upsert", "_parse_errors": [],
        "_source_file": "b1#0", "_batch_id": "b1", "_extracted_at": dt.datetime(2026, 1, 5)}
    spark.createDataFrame([row], schema).write.format("delta").mode("append").save(path)

    commits = "".join(p.read_text(encoding="utf-8") for p in sorted(Path(path, "_delta_log").glob("*.json")))
    assert "minValues" in commits and "p-pseudonym-1" in commits  # ids still serve data skipping
    for text in ("Tremblay", "Gagnon", "rue des"):
        assert text not in commits


def test_only_ids_dates_and_numbers_outside_the_partition_columns_are_kept():
    kept = stats_columns(staged_schema("lab_result"), ("establishment_id",))
    assert {"measurement_id", "person_id", "measurement_date", "value_as_number"} <= set(kept)
    assert not {"establishment_id", "unit_source_value", "value_source_value", "measurement_source_value",
                "_source_file", "record_action"} & set(kept)


def test_silver_tables_keep_statistics_of_ids_dates_and_numbers_only(spark, tmp_path):
    from jobs.stages.land import ensure_silver_table
    from jobs.core.lake import Lake
    from jobs.core.schemas import SILVER_SCHEMAS

    lake = Lake(str(tmp_path / "lake"))
    ensure_silver_table(spark, lake, "encounter", "fingerprint")
    kept = table_properties(spark, lake.silver("encounter"))[STATS_COLUMNS].split(",")
    assert kept == stats_columns(SILVER_SCHEMAS["encounter"], ("establishment_id",))
    assert "care_site_source_value" not in kept and "visit_source_value" not in kept and "person_id" in kept
