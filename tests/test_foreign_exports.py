"""Extracts shaped like other hospitals' systems land by adding YAML only.

Three establishments, onboarded by copying their profile (``establishment.yaml``
of ``tests/fixtures/foreign/``) into ``config/establishments/`` and adding an
agreement, each send one delivered batch through every stage: a US-style EHR
CSV snapshot, FHIR transaction Bundles and a FHIR Bulk NDJSON export of some of
the same people. See ``tests/fixtures/foreign/build.py`` for what they hold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from pyspark.sql import functions as F

from jobs.core.schemas import DATASETS
from tests.conftest import CONFIG_DIR, TEST_KEY

FOREIGN = Path(__file__).parent / "fixtures" / "foreign"
SHAPES = ("us_ehr_snapshot", "fhir_bundles", "fhir_bulk")
CSV_EST, BUNDLE_EST, BULK_EST = "clinique_frontiere", "centre_vallee", "institut_nord"
# Rows of the CSV snapshot planted as invalid (tests/fixtures/foreign/build.py): a malformed SNOMED
# code and a malformed LOINC code. The two observations sharing a derived id (same code, same minute)
# are two measurements: the profile's derived_id_sequence lands both.
PLANTED_INVALID = {"diagnosis": 1, "lab_result": 1}
PLANTED_DUPLICATES = {"lab_result": 1}


def _onboard(root: Path) -> Path:
    """A copy of the shipped configuration plus the three profiles and their agreements (YAML only)."""
    config = root / "config"
    shutil.copytree(CONFIG_DIR, config)
    agreements_path = config / "agreements.yaml"
    agreements = yaml.safe_load(agreements_path.read_text(encoding="utf-8"))
    for shape in SHAPES:
        profile = yaml.safe_load((FOREIGN / shape / "establishment.yaml").read_text(encoding="utf-8"))
        shutil.copy(FOREIGN / shape / "establishment.yaml", config / "establishments" / f"{profile['id']}.yaml")
        agreements["agreements"].append({"establishment": profile["id"], "datasets": list(DATASETS),
                                         "purposes": ["research_general"]})
        batch = next(p for p in (FOREIGN / shape / "batch").iterdir() if p.is_dir())
        shutil.copytree(batch, root / "landing" / profile["landing_folder"] / batch.name)
    agreements_path.write_text(yaml.safe_dump(agreements, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def foreign(spark, tmp_path_factory):
    """Every foreign batch taken through ingest, pseudonymise, validate and land; the stages' outcomes."""
    from jobs.stages import pipeline
    from jobs.core.settings import Settings

    root = tmp_path_factory.mktemp("foreign")
    config = _onboard(root)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AFFLUENT_LAKE_ROOT": str(root / "lake"), "AFFLUENT_LANDING_ROOT": str(root / "landing"),
                            "AFFLUENT_CONFIG_DIR": str(config), "AFFLUENT_PSEUDONYM_KEY": TEST_KEY}.items():
            mp.setenv(name, value)
        ctx = pipeline.Context(Settings.from_env())
        ctx.__dict__["spark"] = spark
        outcomes = {}
        for est in (CSV_EST, BUNDLE_EST, BULK_EST):
            (batch,) = pipeline.pending(ctx, est)
            outcomes[est] = pipeline.run_batch(ctx, est, batch)
        yield ctx, outcomes


def _silver(ctx, dataset: str, est: str):
    return ctx.spark.read.format("delta").load(ctx.lake.silver(dataset)).where(F.col("establishment_id") == est)


def _quarantine(ctx, est: str):
    return ctx.spark.read.format("delta").load(ctx.lake.quarantine()).where(F.col("establishment_id") == est)


def test_the_profiles_pass_the_configuration_check(tmp_path):
    from jobs.core.config import load_consortium

    consortium = load_consortium(_onboard(tmp_path))
    assert {CSV_EST, BUNDLE_EST, BULK_EST} <= set(consortium.establishments)


def test_the_csv_snapshot_lands_its_valid_rows_and_reconciles(foreign):
    ctx, outcomes = foreign
    ingest, land = outcomes[CSV_EST]["ingest"], outcomes[CSV_EST]["land"]
    assert ingest["kind"] == "full"
    for dataset, read in ((d, ingest["bronze"].get(d, 0) + ingest["quarantined"].get(d, 0))
                          for d in ("patient", "encounter", "diagnosis", "lab_result", "medication")):
        landed, quarantined = land["landed"].get(dataset, 0), land["quarantined"].get(dataset, 0)
        duplicates = land["duplicates"].get(dataset, 0)
        assert read == landed + quarantined + duplicates, dataset
        assert duplicates == PLANTED_DUPLICATES.get(dataset, 0), dataset
        valid = read - PLANTED_INVALID.get(dataset, 0) - duplicates
        assert landed >= 0.95 * valid, f"{dataset}: {landed} of {valid} valid rows landed"
        assert _silver(ctx, dataset, CSV_EST).count() == landed
    rules = {(r["dataset"], r["rule"]): r["count"] for r in _quarantine(ctx, CSV_EST).groupBy("dataset", "rule").count().collect()}
    assert rules == {("diagnosis", "conformance.code"): 1, ("lab_result", "conformance.code"): 1}
    # The export's claims and procedures files are not collected: counted, never read.
    assert ingest["not_collected"] == 4


def test_the_snapshot_carries_condition_ends_visit_reasons_and_observation_categories(foreign):
    ctx, _ = foreign
    ended = {r.condition_source_value: r.condition_end_date is not None
             for r in _silver(ctx, "diagnosis", CSV_EST).collect()}
    assert ended == {"44054006": False, "38341003": False, "195662009": True, "10509002": True,
                     "15777000": False, "271737000": False}
    encounters = _silver(ctx, "encounter", CSV_EST).collect()
    assert {(r.visit_source_value, r.visit_reason_source_value is not None) for r in encounters} == {
        ("ambulatory", False), ("outpatient", True)}
    assert {r.visit_reason_source_vocabulary for r in encounters} == {None, "SNOMED"}
    categories = {r.category: r["count"] for r in _silver(ctx, "lab_result", CSV_EST).groupBy("category").count().collect()}
    assert set(categories) == {"vital-signs", "laboratory", "survey"} and categories["survey"] == 24


def test_standard_vocabularies_and_units_of_the_snapshot_are_kept(foreign):
    ctx, _ = foreign
    vocabularies = {r[0] for r in _silver(ctx, "diagnosis", CSV_EST).select("condition_source_vocabulary").distinct().collect()}
    assert vocabularies == {"SNOMED"}
    drugs = {r[0] for r in _silver(ctx, "medication", CSV_EST).select("drug_source_vocabulary").distinct().collect()}
    assert drugs == {"RxNorm"}
    haemoglobin = _silver(ctx, "lab_result", CSV_EST).where(F.col("measurement_source_value") == "718-7")
    assert haemoglobin.count() == 24  # 12 people x 2 encounters, in g/dL, none rejected for its unit


def test_derived_ids_are_keyed_like_other_ids(foreign):
    ctx, _ = foreign
    ids = [r[0] for r in _silver(ctx, "lab_result", CSV_EST).select("measurement_id").collect()]
    assert len(ids) == len(set(ids)) and all(len(i) == 64 for i in ids)
    bronze = ctx.spark.read.format("delta").load(ctx.lake.bronze("lab_result")).where(F.col("_establishment") == CSV_EST)
    assert not set(ids) & {r[0] for r in bronze.select("lab_result_ref").collect()}


def test_the_same_people_get_the_same_person_id_across_establishments(foreign):
    ctx, _ = foreign
    people = {}
    for est in (CSV_EST, BUNDLE_EST, BULK_EST):
        rows = _silver(ctx, "patient", est).select("person_id", "person_id_source", "year_of_birth").collect()
        assert {r.person_id_source for r in rows} == {"enterprise_mpi"}, est
        people[est] = {r.person_id for r in rows}
    assert len(people[CSV_EST]) == 12 and len(people[BUNDLE_EST]) == 6 and len(people[BULK_EST]) == 4
    assert people[BUNDLE_EST] <= people[CSV_EST]
    assert people[BULK_EST] <= people[CSV_EST]
    assert not people[BUNDLE_EST] & people[BULK_EST]


@pytest.mark.parametrize("est", [BUNDLE_EST, BULK_EST])
def test_fhir_exports_land_components_and_count_what_is_not_collected(foreign, est):
    ctx, outcomes = foreign
    labs = _silver(ctx, "lab_result", est)
    codes = {r[0]: r[1] for r in labs.groupBy("measurement_source_value").count().collect()}
    encounters = _silver(ctx, "encounter", est).count()
    # Each encounter: a blood-pressure panel in components (systolic, diastolic) and a haemoglobin.
    assert codes.get("8480-6") == codes.get("8462-4") == codes.get("718-7") == encounters
    assert _quarantine(ctx, est).count() == 0
    ingest, land = outcomes[est]["ingest"], outcomes[est]["land"]
    # Bundles: a Procedure and a DiagnosticReport per encounter; Bulk: a Procedure file.
    assert ingest["not_collected"] == (2 if est == BUNDLE_EST else 1) * encounters

    # Every entry delivered is accounted for: landed + quarantined + duplicates + not collected, where a
    # component panel is one entry and several rows.
    manifest_dir = next((FOREIGN / ("fhir_bundles" if est == BUNDLE_EST else "fhir_bulk") / "batch").iterdir())
    delivered = sum(f["rows"] for f in json.loads((manifest_dir / "manifest.json").read_text())["files"])
    bronze = ctx.spark.read.format("delta").load(ctx.lake.bronze("lab_result")).where(F.col("_establishment") == est)
    extra_rows = bronze.count() - bronze.select("_source_file", "_source_line").distinct().count()
    assert extra_rows == encounters  # each blood-pressure panel: one entry, two rows
    accounted = sum(land[k].get(d, 0) for k in ("landed", "quarantined", "duplicates") for d in land["landed"])
    assert delivered == accounted - extra_rows + ingest["not_collected"]
    assert sum(land["landed"].values()) >= 0.95 * (accounted - sum(land["duplicates"].values()))


def test_foreign_exports_get_standard_concepts_through_the_shipped_maps(foreign, capsys):
    from jobs.terminology.coverage import MEASURED_DATASETS, coverage, render

    ctx, _ = foreign
    for est in (CSV_EST, BUNDLE_EST, BULK_EST):
        genders = {r[0] for r in _silver(ctx, "patient", est).select("gender_concept_id").distinct().collect()}
        assert genders == {8507, 8532}, est
        diagnoses = {(r.condition_source_value, r.condition_concept_code)
                     for r in _silver(ctx, "diagnosis", est).collect()}
        assert diagnoses and all(concept != "0" for _, concept in diagnoses), est
        assert ("44054006", "E11") in diagnoses or est != CSV_EST
        drugs = {(r.drug_source_value, r.drug_concept_code, r.drug_concept_map)
                 for r in _silver(ctx, "medication", est).collect()}
        assert drugs and all(m == "rxnorm-atc|1" for _, _, m in drugs), est
        haemoglobin = _silver(ctx, "lab_result", est).where(F.col("measurement_source_value") == "718-7").collect()
        assert haemoglobin and all(r.unit_source_value == "g/dL" and r.unit_concept_code == "g/L"
                                   and r.value_as_number == pytest.approx(10 * r.value_source_as_number)
                                   for r in haemoglobin), est
    for est in (CSV_EST, BUNDLE_EST):  # 'ambulatory' and 'outpatient' words; Encounter.class AMB
        visits = {r[0] for r in _silver(ctx, "encounter", est).select("visit_concept_id").distinct().collect()}
        assert visits == {9202}, est

    found = [c for d in MEASURED_DATASETS for c in coverage(
        ctx.spark.read.format("delta").load(ctx.lake.silver(d)), d, ctx.consortium.pipeline.min_cell_size)]
    print(render(found, ctx.consortium.pipeline.min_cell_size))
    out = capsys.readouterr().out
    assert all(est in out for est in (CSV_EST, BUNDLE_EST, BULK_EST))
    by_key = {(c.establishment_id, c.dataset): c for c in found}
    assert by_key[(CSV_EST, "diagnosis")].row_share == 100.0
    assert by_key[(CSV_EST, "medication")].row_share == 100.0


def test_the_same_snapshot_delivered_again_changes_no_row(spark, tmp_path, monkeypatch):
    """The CSV snapshot delivered again a week later, identical but for its manifest: every row lands,
    none is rewritten, the change feed of every silver table shows nothing, the batch log counts them
    as unchanged."""
    from jobs.stages import pipeline
    from jobs.core.ops import read_batch_log
    from jobs.core.settings import Settings
    from jobs.core.tables import table_version

    config = _onboard(tmp_path)
    for name, value in {"AFFLUENT_LAKE_ROOT": str(tmp_path / "lake"), "AFFLUENT_LANDING_ROOT": str(tmp_path / "landing"),
                        "AFFLUENT_CONFIG_DIR": str(config), "AFFLUENT_PSEUDONYM_KEY": TEST_KEY}.items():
        monkeypatch.setenv(name, value)
    ctx = pipeline.Context(Settings.from_env())
    ctx.__dict__["spark"] = spark
    first = next((tmp_path / "landing" / CSV_EST).iterdir())
    landed = pipeline.run_batch(ctx, CSV_EST, first.name)["land"]

    again = first.parent / "20261108-full"
    shutil.copytree(first, again)
    manifest = json.loads((again / "manifest.json").read_text())
    manifest |= {"batch_id": again.name, "extracted_at": "2026-11-08T02:00:00Z"}
    (again / "manifest.json").write_text(json.dumps(manifest, indent=2))
    datasets = [d for d, n in landed["landed"].items() if n]
    before = {d: (table_version(spark, ctx.lake.silver(d)), _silver(ctx, d, CSV_EST).collect()) for d in datasets}

    assert pipeline.pending(ctx, CSV_EST) == [again.name]
    land = pipeline.run_batch(ctx, CSV_EST, again.name)["land"]
    assert land["landed"] == landed["landed"] and land["unchanged"] == land["landed"]
    for dataset, (version, rows) in before.items():
        assert sorted(_silver(ctx, dataset, CSV_EST).collect()) == sorted(rows), dataset
        feed = (spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", 0)
                .load(ctx.lake.silver(dataset)).where(F.col("_commit_version") > version))
        assert feed.count() == 0, dataset
    log = read_batch_log(spark, ctx.lake).where((F.col("batch_id") == again.name) & (F.col("stage") == "land"))
    assert {r.dataset: (r.rows_landed, r.rows_unchanged) for r in log.collect() if r.rows_landed} == {
        d: (n, n) for d, n in land["landed"].items() if n}


def test_csv_files_not_collected_are_counted_per_file_and_never_read(spark, tmp_path):
    """A Synthea-like export's claims and procedures files (in the fixture) and two more files, listed
    as not collected in the CSV profile: the batch is taken, each file's rows are counted in the batch
    log by file reference, none is read (a body line that would be quarantined if parsed is not), and
    the manifest's rows add up."""
    import hashlib

    from jobs.core.config import load_consortium
    from jobs.stages.ingest import ingest_batch
    from jobs.core.lake import Lake
    from jobs.core.ops import read_batch_log

    config = _onboard(tmp_path)
    profile_path = config / "establishments" / f"{CSV_EST}.yaml"
    profile = yaml.safe_load(profile_path.read_text(encoding="utf-8"))
    profile["input"]["files"]["not_collected"] += ["imaging_studies_*.csv", "payer_transitions_*.csv"]
    profile_path.write_text(yaml.safe_dump(profile, allow_unicode=True, sort_keys=False), encoding="utf-8")
    consortium = load_consortium(config)

    landing = tmp_path / "landing"
    folder = next((landing / CSV_EST).iterdir())
    extra = {
        "imaging_studies_20261101.csv": b"Id,PATIENTID,PROVIDERID,PRIMARYPATIENTINSURANCEID,DIAGNOSIS1,OUTSTANDING1\n"
                               b"c1,59c73cd0,pr1,ins1,44054006,12.5\n"
                               b"c2,\xff\xfe not UTF-8 at all,pr1,,,\n"
                               b"c3,\"a, quoted\nfield over two lines\",pr2,,,\n",
        "payer_transitions_20261101.csv": b"START,STOP,PATIENT,ENCOUNTER,SYSTEM,CODE,DESCRIPTION,BASE_COST\n"
                                   b"2026-03-05T09:10:00Z,,59c73cd0,80c7cfa0,http://snomed.info/sct,430193006,"
                                   b"Medication reconciliation (procedure),307.0\n",
    }
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, content in extra.items():
        (folder / name).write_bytes(content)
        rows = 3 if name.startswith("imaging") else 1  # a quoted line break continues its record
        manifest["files"].append({"path": name, "sha256": hashlib.sha256(content).hexdigest(), "rows": rows})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))

    lake = Lake(str(tmp_path / "lake"))
    outcome = ingest_batch(spark, lake, landing, consortium, CSV_EST, folder.name)
    assert outcome.not_collected == 8
    assert "not_collected" not in outcome.bronze and "not_collected" not in outcome.quarantined
    log = {r.dataset: r for r in read_batch_log(spark, lake).where(F.col("stage") == "ingest").collect()}
    entry = log["not_collected"]
    assert (entry.status, entry.rows_read, entry.rows_not_collected) == ("ingested", 0, 8)
    assert entry.message == f"8 entries not collected; files not collected, never read: {folder.name}#5 3 rows, " \
                            f"{folder.name}#6 1 rows, {folder.name}#7 3 rows, {folder.name}#8 1 rows"
    quarantine = spark.read.format("delta").load(lake.quarantine())
    assert quarantine.where(F.col("source_file").isin(*[f"{folder.name}#{i}" for i in range(5, 9)])).count() == 0
    # Per batch: rows in the manifest = rows read + rows not collected.
    assert sum(f["rows"] for f in manifest["files"]) == sum((r.rows_read or 0) + (r.rows_not_collected or 0)
                                                          for r in log.values())
