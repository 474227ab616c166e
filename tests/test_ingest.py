import datetime as dt
import json

import pytest
from pyspark.sql import functions as F

from jobs.stages.batch_queue import pending_batches
from jobs.stages.ingest import ingest_batch
from jobs.core.lake import Lake
from jobs.stages.landing import BatchRejected
from jobs.core.ops import read_batch_log
from jobs.core.tables import table_version
from tests.landing_helpers import (LAURENTIDES_ENCOUNTER_HEADER, LAURENTIDES_PATIENT_HEADER, latin1_csv,
                                   write_batch)

PATIENTS = [
    "L001;TREM85521512;Tremblay;Éloïse;12/02/1985;F;12 rue des Érables;Montréal;H2X 1Y4;514-555-0101;e@x.ca;;A",
    "L002;GAGL90010112;Gagnon;Luc;01/01/1990;M;3 av. du Parc;Laval;H7N 2B3;450-555-0102;l@x.ca;;A",
    "L003;bad",
]
ENCOUNTERS = [
    "S1;L001;03/01/2026 08:00;04/01/2026 12:30;hospitalisation;Médecine;Douleur thoracique;A",
    "S2;L002;31/02/2026 08:00;;urgence;Urgence;;A",
]


@pytest.fixture()
def landed(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    landing = tmp_path / "landing"
    write_batch(landing, "chu_laurentides", "20260105-001", {
        "patients.csv": ("patient", latin1_csv(LAURENTIDES_PATIENT_HEADER, PATIENTS)),
        "sejours.csv": ("encounter", latin1_csv(LAURENTIDES_ENCOUNTER_HEADER, ENCOUNTERS)),
    })
    return lake, landing


def test_ingest_accounts_for_every_row_and_is_skipped_the_second_time(spark, consortium, landed):
    lake, landing = landed
    assert pending_batches(lake, landing, consortium, "chu_laurentides") == ["20260105-001"]
    outcome = ingest_batch(spark, lake, landing, consortium, "chu_laurentides", "20260105-001")
    assert outcome.bronze == {"patient": 2, "encounter": 2}
    assert outcome.quarantined == {"patient": 1}
    bronze = spark.read.format("delta").load(lake.bronze("patient"))
    assert bronze.where(F.col("patient_ref") == "L001").first()._source_file == "20260105-001#0"
    versions = {t: table_version(spark, p) for t, p in
                [("b", lake.bronze("patient")), ("q", lake.quarantine()), ("log", lake.ops("batch_log"))]}
    again = ingest_batch(spark, lake, landing, consortium, "chu_laurentides", "20260105-001")
    assert again.skipped
    assert versions == {t: table_version(spark, p) for t, p in
                        [("b", lake.bronze("patient")), ("q", lake.quarantine()), ("log", lake.ops("batch_log"))]}
    # Ingested but not landed: still the head of the queue, so the next run goes on with it.
    assert pending_batches(lake, landing, consortium, "chu_laurentides") == ["20260105-001"]


def _cached_plans(spark) -> bool:
    """Whether the session's cache manager holds any cached plan (each one is compared with every later query)."""
    return not spark._jsparkSession.sharedState().cacheManager().isEmpty()


def test_ingest_leaves_nothing_cached_in_the_session(spark, consortium, landed):
    lake, landing = landed
    spark.catalog.clearCache()
    outcome = ingest_batch(spark, lake, landing, consortium, "chu_laurentides", "20260105-001")
    assert outcome.bronze == {"patient": 2, "encounter": 2}
    assert not _cached_plans(spark)


@pytest.mark.parametrize("failing, named", [({"encounter"}, "#1"), ({"patient", "encounter"}, "#0")])
def test_files_read_side_by_side_stop_the_batch_in_manifest_order_and_release_every_parse(
        spark, consortium, landed, monkeypatch, failing, named):
    """The files of a batch are read at once; the first failing one in the manifest stops the batch, as if read
    one by one, and the parses of the files read beside it are released."""
    from jobs.readers.csv import HeaderError
    from jobs.stages import ingest

    lake, landing = landed
    real = ingest._read_file

    def read(spark_, path, dataset, est, lineage, max_field_bytes):
        if dataset in failing:
            raise HeaderError(f"{lineage.source_file}: line 1: planted failure")
        return real(spark_, path, dataset, est, lineage, max_field_bytes)

    monkeypatch.setattr(ingest, "_read_file", read)
    spark.catalog.clearCache()
    with pytest.raises(BatchRejected, match=f"20260105-001{named}: line 1: planted failure"):
        ingest_batch(spark, lake, landing, consortium, "chu_laurentides", "20260105-001")
    assert not _cached_plans(spark)
    assert [(r.status, r.source_file) for r in read_batch_log(spark, lake).collect()] == [
        ("rejected", f"20260105-001{named}")]
    assert table_version(spark, lake.bronze("patient")) is None


@pytest.mark.parametrize("breakage, reason", [
    (lambda folder: (folder / "sejours.csv").unlink(), "the file is missing"),
    (lambda folder: (folder / "sejours.csv").write_bytes(b"changed"), "the file's sha256 does not match"),
    (lambda folder: _edit_manifest(folder, lambda m: m["files"][0].update(dataset="imaging")), "unknown dataset 'imaging'"),
    (lambda folder: _edit_manifest(folder, lambda m: m["files"][0].update(path="../../etc/passwd")), "leaves the batch folder"),
    (lambda folder: _edit_manifest(folder, lambda m: m["files"][0].update(rows=99)), "the file has 3 rows, the manifest says 99"),
    (lambda folder: (folder / "manifest.json").write_text("{not json"), "not valid JSON"),
])
def test_a_batch_breaking_the_contract_is_rejected_whole(spark, consortium, landed, breakage, reason):
    lake, landing = landed
    breakage(landing / "chu_laurentides" / "20260105-001")
    with pytest.raises(BatchRejected, match=reason):
        ingest_batch(spark, lake, landing, consortium, "chu_laurentides", "20260105-001")
    assert table_version(spark, lake.bronze("patient")) is None
    log = read_batch_log(spark, lake).collect()
    assert [(r.status, reason in r.message) for r in log] == [("rejected", True)]
    # Delivered file names stay in landing: the log names files by their reference.
    assert not any(name in f"{r.message} {r.source_file}" for r in log for name in ("sejours", "patients", "passwd"))


def test_unknown_establishment_is_rejected(spark, consortium, landed):
    lake, landing = landed
    with pytest.raises(BatchRejected, match="unknown establishment"):
        ingest_batch(spark, lake, landing, consortium, "nowhere", "20260105-001")


def _edit_manifest(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_renamed_source_column_stops_the_batch_naming_both_headers(spark, consortium, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    landing = tmp_path / "landing"
    renamed = LAURENTIDES_ENCOUNTER_HEADER.replace(";unite;", ";ward;")
    write_batch(landing, "chu_laurentides", "20260105-001", {
        "patients.csv": ("patient", latin1_csv(LAURENTIDES_PATIENT_HEADER, PATIENTS[:2])),
        "sejours.csv": ("encounter", latin1_csv(renamed, ENCOUNTERS)),
    })
    with pytest.raises(BatchRejected) as raised:
        ingest_batch(spark, lake, landing, consortium, "chu_laurentides", "20260105-001")
    message = raised.value.reason
    assert "missing ['unite'], unexpected ['ward']" in message
    assert str(renamed.split(";")) in message and "'unite'" in message.split("profile expects")[1]
    assert table_version(spark, lake.bronze("patient")) is None and table_version(spark, lake.bronze("encounter")) is None
    assert [(r.status, r.dataset) for r in read_batch_log(spark, lake).collect()] == [("rejected", "encounter")]


def test_a_byte_order_mark_in_a_utf8_profile_is_removed_and_said_in_the_batch_log(spark, consortium, tmp_path):
    import dataclasses

    from tests.landing_helpers import RIVIERE_PATIENT_HEADER, utf8_bom_csv

    riviere = consortium.establishments["hopital_riviere"]
    utf8 = riviere.model_copy(update={"input": riviere.input.model_copy(update={"encoding": "utf-8"})})
    utf8_consortium = dataclasses.replace(consortium, establishments={**consortium.establishments,
                                                                      "hopital_riviere": utf8})
    lake = Lake(str(tmp_path / "lake"))
    landing = tmp_path / "landing"
    write_batch(landing, "hopital_riviere", "20260105-001", {"patients.csv": ("patient", utf8_bom_csv(
        RIVIERE_PATIENT_HEADER,
        ["R001,RIVA85521512,Rivard,Anne,1985-02-12,F,1 Main St,Rimouski,G5L 1A1,418-555-0101,a@x.ca,,I"]))})
    outcome = ingest_batch(spark, lake, landing, utf8_consortium, "hopital_riviere", "20260105-001")
    assert outcome.bronze == {"patient": 1} and outcome.quarantined == {}
    log = read_batch_log(spark, lake).collect()
    assert [r.status for r in log] == ["ingested"]
    assert "20260105-001#0: UTF-8 byte-order mark (EF BB BF) removed" in log[0].message
    assert spark.range(2).count() == 2


def test_a_quoted_note_with_line_breaks_is_one_row_of_the_manifest(spark, consortium, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    landing = tmp_path / "landing"
    note = '"Douleur; irradiant\r\nau bras ""gauche""\r\n\r\nvu en urgence"'
    content = latin1_csv(LAURENTIDES_ENCOUNTER_HEADER, [
        f"S1;L001;03/01/2026 08:00;04/01/2026 12:30;hospitalisation;Médecine;{note};A", ENCOUNTERS[1]])
    write_batch(landing, "chu_laurentides", "20260105-001", {"sejours.csv": ("encounter", content)},
                manifest_overrides=None)
    manifest = json.loads((landing / "chu_laurentides" / "20260105-001" / "manifest.json").read_text())
    manifest["files"][0]["rows"] = 2
    (landing / "chu_laurentides" / "20260105-001" / "manifest.json").write_text(json.dumps(manifest))
    outcome = ingest_batch(spark, lake, landing, consortium, "chu_laurentides", "20260105-001")
    assert outcome.bronze == {"encounter": 2}
    notes = {r.encounter_ref: r.admission_note for r in spark.read.format("delta").load(lake.bronze("encounter")).collect()}
    assert notes["S1"] == 'Douleur; irradiant\nau bras "gauche"\n\nvu en urgence'


def _fhir_observation(oid: str, **fields) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2026-01-04T09:00:00-05:00", **fields}


def _loinc(code: str) -> dict:
    return {"coding": [{"system": "http://loinc.org", "code": code}]}


def _mmhg(value: int) -> dict:
    return {"value": value, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}


def test_fhir_components_and_resources_not_collected_reconcile_per_file_and_reach_the_batch_log(
        spark, consortium, tmp_path):
    from pyspark.sql.types import StructType

    from jobs.stages.batch_queue import batch_log_entries
    from jobs.core.ops import BATCH_LOG_SCHEMA

    lake = Lake(str(tmp_path / "lake"))
    landing = tmp_path / "landing"
    # A batch log written before rows_not_collected existed: ingest appends to it all the same.
    newer = ("rows_not_collected", "rows_unchanged")
    legacy = StructType([f for f in BATCH_LOG_SCHEMA.fields if f.name not in newer])
    (spark.createDataFrame([("cisss_estuaire", "20260101-001", None, "steward", "skipped", None, None, None, None,
                             "set aside", None, dt.datetime(2026, 1, 2), None, None, None)], legacy)
     .write.format("delta").save(lake.ops("batch_log")))
    panel = _fhir_observation("bp1", code=_loinc("85354-9"), component=[
        {"code": _loinc("8480-6"), "valueQuantity": _mmhg(120)},
        {"code": _loinc("8462-4"), "valueQuantity": _mmhg(80)}])
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1950-02-03"}},
        {"resource": panel},
        {"resource": {"resourceType": "Procedure", "id": "pr1", "subject": {"reference": "Patient/p1"}}},
        {"resource": {"resourceType": "Organization", "id": "org1", "name": "CISSS de l'Estuaire"}},
        {"resource": {"resourceType": "Frobnicate", "id": "f1"}},
    ]}
    ndjson = "\n".join(json.dumps(r) for r in [
        _fhir_observation("o2", code=_loinc("2345-7"), valueQuantity={"value": 5.4, "code": "mmol/L"}),
        {"resourceType": "Provenance", "id": "pv1", "recorded": "2026-01-04T10:00:00Z"},
    ]) + "\n"
    folder = write_batch(landing, "cisss_estuaire", "20260105-001", {
        "bundle.json": ("bundle", json.dumps(bundle).encode()),
        "Observation.ndjson": ("lab_result", ndjson.encode()),
        # A whole file of a type not collected: counted from the manifest, never read.
        "Procedure.ndjson": ("not_collected", b'{"resourceType":"Procedure","id":"pr2"}\n{"resourceType":"Procedure"}\n'),
    }, has_header=False)
    _edit_manifest(folder, lambda m: m["files"][0].update(rows=len(bundle["entry"])))

    spark.catalog.clearCache()
    outcome = ingest_batch(spark, lake, landing, consortium, "cisss_estuaire", "20260105-001")
    assert not _cached_plans(spark)  # the parsed entries, cached for bronze, quarantine and counts, are released
    assert {d: n for d, n in outcome.bronze.items() if n} == {"patient": 1, "lab_result": 3}
    assert outcome.quarantined == {"bundle": 1}
    assert outcome.not_collected == 5
    log = {r.dataset: r for r in read_batch_log(spark, lake).where(F.col("stage") == "ingest").collect()}
    assert {d: (r.rows_read, r.rows_quarantined, r.rows_not_collected) for d, r in log.items() if r.rows_read} == {
        "patient": (1, 0, 0), "lab_result": (3, 0, 1), "bundle": (1, 1, 2)}
    assert (log["not_collected"].rows_read, log["not_collected"].rows_not_collected) == (0, 2)
    assert "3 rows in bronze from 2 entries (1 more rows from Observation components)" in log["lab_result"].message
    assert "2 entries not collected (Organization 1, Procedure 1)" in log["bundle"].message
    assert "Estuaire" not in " ".join(r.message or "" for r in log.values())
    # The batch adds up: manifest rows = rows read + not collected - the extra component rows.
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sum(f["rows"] for f in manifest["files"]) == 9 == 5 + 5 - 1
    refs = {r.lab_result_ref for r in spark.read.format("delta").load(lake.bronze("lab_result")).collect()}
    assert refs == {"bp1/component/0", "bp1/component/1", "o2"}
    # The legacy entry reads the new column as null, in Spark and through delta-rs.
    entries = {e["batch_id"] + (e["dataset"] or ""): e for e in batch_log_entries(lake, "cisss_estuaire")}
    assert entries["20260101-001"]["rows_not_collected"] is None
    assert entries["20260105-001bundle"]["rows_not_collected"] == 2


def test_a_rejected_batch_ends_the_run_with_the_line_batches_shows_and_redelivery_takes_it_again(
        spark, landed, monkeypatch, capsys):
    """`affluent run` on a batch breaking the landing contract: one line on stderr, no traceback, a non-zero
    exit; `affluent batches` shows the same line, which says re-delivery is enough; a corrected manifest
    makes the batch pending again without a retry."""
    from jobs.app.cli import EXIT_STOPPED, main
    from jobs.core.config import load_consortium
    from tests.conftest import CONFIG_DIR, TEST_KEY

    lake, landing = landed
    folder = landing / "chu_laurentides" / "20260105-001"
    _edit_manifest(folder, lambda m: m["files"][0].update(rows=99))
    for name, value in {"AFFLUENT_LAKE_ROOT": lake.root, "AFFLUENT_LANDING_ROOT": str(landing),
                        "AFFLUENT_CONFIG_DIR": str(CONFIG_DIR), "AFFLUENT_PSEUDONYM_KEY": TEST_KEY}.items():
        monkeypatch.setenv(name, value)

    assert main(["run", "--establishment", "chu_laurentides"]) == EXIT_STOPPED
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    line = err.strip()
    assert line.startswith("chu_laurentides: queue blocked by 20260105-001, blocked at ingest (file 20260105-001#0)")
    assert "the file has 3 rows, the manifest says 99" in line
    assert "re-delivers it (corrected files and manifest.json): it is taken again by itself, no retry needed" in line

    assert main(["batches", "--establishment", "chu_laurentides"]) == 0
    assert line in capsys.readouterr().out.splitlines()
    # Nothing to run while the queue is blocked: the same line, the same exit.
    assert main(["run", "--establishment", "chu_laurentides"]) == EXIT_STOPPED
    assert capsys.readouterr().err.strip() == line

    _edit_manifest(folder, lambda m: m["files"][0].update(rows=3))  # re-delivered, corrected
    assert pending_batches(lake, landing, load_consortium(CONFIG_DIR), "chu_laurentides") == ["20260105-001"]


def test_an_empty_file_is_logged_as_a_dataset_read_with_no_rows(spark, consortium, tmp_path):
    """An export of no records is still a dataset of the batch: its ingested entry says 0 rows read (land
    reads it as an empty file, whose absence of records deletes nothing)."""
    lake, landing = Lake(str(tmp_path / "lake")), tmp_path / "landing"
    write_batch(landing, "chu_laurentides", "20260105-001", {
        "patients.csv": ("patient", latin1_csv(LAURENTIDES_PATIENT_HEADER, PATIENTS[:1])),
        "sejours.csv": ("encounter", latin1_csv(LAURENTIDES_ENCOUNTER_HEADER, [])),
    })
    outcome = ingest_batch(spark, lake, landing, consortium, "chu_laurentides", "20260105-001")
    assert outcome.bronze == {"patient": 1, "encounter": 0}
    log = {r.dataset: r for r in read_batch_log(spark, lake).where(F.col("stage") == "ingest").collect()}
    assert (log["encounter"].rows_read, log["encounter"].status) == (0, "ingested")
    # Found empty from its bytes, after its header was checked: no Spark read, no bronze commit for it.
    from jobs.core.tables import table_exists

    assert table_exists(spark, lake.bronze("patient")) and not table_exists(spark, lake.bronze("encounter"))


def test_a_file_holds_no_record_when_only_blank_lines_follow_its_header(tmp_path, consortium):
    from jobs.readers.csv import NO_RECORD_PROBE_BYTES, holds_no_record

    profile = consortium.establishment("chu_laurentides").input
    header = LAURENTIDES_ENCOUNTER_HEADER.encode("latin-1")
    cases = {
        b"": True, header: True, header + b"\n": True, header + b"\r\n\r\n  \n": True, header + b"\r   \r": True,
        header + b"\n\t\n": False,  # Spark trims spaces only: a tab line is a record (quarantined as malformed)
        header + b"\nS1;K001\n": False, header + b"\n\n\nS1\n": False, header + b"\n\x00": False,
        b'"no_sejour\nsuite";no_dossier\n': False,  # a quoted header may span lines: left to Spark
        header + b"\n" + b" " * NO_RECORD_PROBE_BYTES: False,  # too large to look at from Python
    }
    for index, (content, expected) in enumerate(cases.items()):
        path = tmp_path / f"{index}.csv"
        path.write_bytes(content)
        assert holds_no_record(path, profile) is expected, content[:80]
