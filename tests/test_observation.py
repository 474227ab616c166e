"""Facts that are not LOINC measurements land in ``observation``; coded answers are concepts, never numbers.

Fixtures: ``tests/fixtures/observation/`` (see its ``build.py``), a Synthea-style
CSV export and a Synthea-style FHIR transaction Bundle of the same three people.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
import yaml
from pyspark.sql import functions as F

from jobs.core.config import Establishment, load_consortium
from jobs.core.schemas import DATASETS
from jobs.readers.csv import FileLineage, read_csv_file
from jobs.readers.fhir import read_fhir_file
from tests.conftest import CONFIG_DIR, TEST_KEY

FIXTURES = Path(__file__).parent / "fixtures" / "observation"
CSV_EST, FHIR_EST = "clinique_synthea", "hopital_synthea"
CSV_BATCH = FIXTURES / "synthea_csv" / "batch" / "20261101-csv"
FHIR_BATCH = FIXTURES / "synthea_fhir" / "batch" / "20261101-bundle"
NOW = dt.datetime(2026, 11, 1, 3, 0)


def _profile(shape: str):
    return Establishment(**yaml.safe_load((FIXTURES / shape / "establishment.yaml").read_text(encoding="utf-8"))).input


def _lineage(est: str, source: str) -> FileLineage:
    return FileLineage(est, "b1", source, NOW, NOW)


# ------------------------------------------------------------- readers ----

def test_csv_rows_are_routed_and_only_declared_word_answers_kept(spark):
    result = read_csv_file(spark, CSV_BATCH / "observations.csv", "lab_result", _profile("synthea_csv"),
                           _lineage(CSV_EST, "b1#2"))
    try:
        lab = {r["loinc_code"]: r["value"] for r in result.bronze["lab_result"].collect()}
        observations = {(r["patient_ref"], r["observation_code"]): (r["category"], r["value"], r["value_system"])
                        for r in result.bronze["observation"].collect()}
        assert lab == {"8302-2": "162.5", "2339-0": "95", "29463-7": "68.4"}
        assert observations == {
            ("p-1", "72166-2"): ("social-history", "Never smoker", None),
            ("p-1", "93043-8"): ("survey", "Yes", None),
            ("p-1", "56799-0"): ("survey", None, None),  # an address: free text, dropped
            ("p-1", "QALY"): (None, "43.2", None),  # routed by its code
            ("p-2", "72166-2"): ("social-history", "Former smoker", None),
            ("p-2", "93030-5"): ("survey", "No", None),
            ("p-2", "93038-8"): ("survey", None, None),  # a word outside the closed list: dropped
            ("p-3", "DALY"): (None, "0.5", None),
            ("p-3", "93035-4"): (None, "Yes", None),  # no category: routed by its answer, as the list writes it
        }
        assert result.free_text_dropped() == 2
        assert result.quarantine.count() == 0
        # Every line read is in exactly one dataset.
        lines = [r["_source_line"] for d in ("lab_result", "observation") for r in result.bronze[d].collect()]
        assert sorted(lines) == list(range(2, 14))
    finally:
        result.unpersist()


def test_a_file_of_observations_keeps_numbers_and_declared_answers_only(spark, tmp_path):
    path = tmp_path / "survey.csv"
    path.write_text("DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,VALUE,UNITS\n"
                    "2026-05-03T10:40:00Z,p-1,e-p-1,survey,93043-8, no ,\n"
                    "2026-05-03T10:40:00Z,p-1,e-p-1,survey,93031-3,3,{#}\n"
                    "2026-05-03T10:40:00Z,p-1,e-p-1,survey,56799-0,5 rue du Port,\n", encoding="utf-8")
    result = read_csv_file(spark, path, "observation", _profile("synthea_csv"), _lineage(CSV_EST, "b1#0"))
    try:
        assert set(result.bronze) == {"observation"}
        assert {r["observation_code"]: r["value"] for r in result.bronze["observation"].collect()} == {
            "93043-8": "No", "93031-3": "3", "56799-0": None}
        assert result.free_text_dropped() == 1
    finally:
        result.unpersist()


def test_fhir_observations_are_routed_by_category_and_code_system(spark):
    result = read_fhir_file(spark, str(FHIR_BATCH / "bundle-1.json"), "bundle", _profile("synthea_fhir"),
                            _lineage(FHIR_EST, "b1#0"))
    try:
        observations = {r["observation_ref"]: r for r in result.bronze["observation"].collect()}
        lab = {r["lab_result_ref"]: r for r in result.bronze["lab_result"].collect()}
        assert set(lab) == {"covid-2", "bmi-3"}
        # A LOINC laboratory test with a coded answer stays a lab result; its answer is a code with its system.
        assert (lab["covid-2"]["value"], lab["covid-2"]["value_system"]) == ("260415000", "SNOMED")
        assert (lab["bmi-3"]["value"], lab["bmi-3"]["value_system"]) == ("24.1", None)
        smoking = observations["smoking-1"]
        assert (smoking["observation_code"], smoking["observation_system"], smoking["category"]) == \
            ("72166-2", "LOINC", "social-history")
        assert (smoking["value"], smoking["value_system"]) == ("266919005", "SNOMED")
        acuity = observations["acuity-1"]  # coded in SNOMED CT only: an observable, not a lab result
        assert (acuity["observation_system"], acuity["category"], acuity["value"], acuity["value_system"]) == \
            ("SNOMED", "exam", "0.8", None)
        panel = {ref: (r["observation_code"], r["value"], r["value_system"])
                 for ref, r in observations.items() if ref.startswith("prapare-3/")}
        assert panel == {"prapare-3/component/0": ("56051-6", "LA32-8", "LOINC"),
                         "prapare-3/component/1": ("63586-2", "40000", None),
                         "prapare-3/component/2": ("93043-8", "Yes", None)}  # a declared word answer
        assert all(r["category"] == "survey" for ref, r in observations.items() if ref.startswith("prapare-3/"))
        (reads,) = result.file_reads().values()
        assert (reads.entries, reads.to_bronze, reads.quarantined, reads.free_text_dropped) == (11, 11, 0, 1)
    finally:
        result.unpersist()


def test_a_profile_routes_a_loinc_code_to_observation(spark, tmp_path):
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {
        "resourceType": "Observation", "id": "qols-1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "QOLS"}]},
        "subject": {"reference": "Patient/p-1"}, "effectiveDateTime": "2026-05-03T10:40:00Z",
        "valueQuantity": {"value": 0.87}}}]}
    path = tmp_path / "b.json"
    import json

    path.write_text(json.dumps(bundle), encoding="utf-8")
    routed = read_fhir_file(spark, str(path), "bundle", _profile("synthea_fhir"), _lineage(FHIR_EST, "b1#0"))
    plain = read_fhir_file(spark, str(path), "bundle", Establishment(
        id="x_est", name="x", landing_folder="x", input={"format": "fhir"}).input, _lineage(FHIR_EST, "b1#0"))
    try:
        assert [r["observation_code"] for r in routed.bronze["observation"].collect()] == ["QOLS"]
        assert routed.bronze["lab_result"].count() == 0
        assert [r["loinc_code"] for r in plain.bronze["lab_result"].collect()] == ["QOLS"]
    finally:
        routed.unpersist()
        plain.unpersist()


def test_the_profile_check_asks_for_the_observation_mapping():
    data = yaml.safe_load((FIXTURES / "synthea_csv" / "establishment.yaml").read_text(encoding="utf-8"))
    del data["input"]["columns"]["observation"]
    del data["input"]["derived_ids"]["observation"]
    del data["input"]["constants"]["observation"]
    problems = Establishment(**data).input.problems()
    assert [key for key, _ in problems] == ["observations"]


# ------------------------------------------------------ every stage ----

@pytest.fixture(scope="module")
def landed(spark, tmp_path_factory):
    """Both establishments onboarded with YAML only and their batch taken through every stage."""
    from jobs.core.settings import Settings
    from jobs.stages import pipeline

    root = tmp_path_factory.mktemp("observation")
    config = root / "config"
    shutil.copytree(CONFIG_DIR, config)
    agreements = yaml.safe_load((config / "agreements.yaml").read_text(encoding="utf-8"))
    for shape, batch in (("synthea_csv", CSV_BATCH), ("synthea_fhir", FHIR_BATCH)):
        profile = yaml.safe_load((FIXTURES / shape / "establishment.yaml").read_text(encoding="utf-8"))
        shutil.copy(FIXTURES / shape / "establishment.yaml", config / "establishments" / f"{profile['id']}.yaml")
        agreements["agreements"].append({"establishment": profile["id"], "datasets": list(DATASETS),
                                         "purposes": ["research_general"]})
        shutil.copytree(batch, root / "landing" / profile["landing_folder"] / batch.name)
    (config / "agreements.yaml").write_text(yaml.safe_dump(agreements, sort_keys=False), encoding="utf-8")
    load_consortium(config)  # the profiles pass the configuration check
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AFFLUENT_LAKE_ROOT": str(root / "lake"), "AFFLUENT_LANDING_ROOT": str(root / "landing"),
                            "AFFLUENT_CONFIG_DIR": str(config), "AFFLUENT_PSEUDONYM_KEY": TEST_KEY}.items():
            mp.setenv(name, value)
        ctx = pipeline.Context(Settings.from_env())
        ctx.__dict__["spark"] = spark
        outcomes = {}
        for est in (CSV_EST, FHIR_EST):
            (batch,) = pipeline.pending(ctx, est)
            outcomes[est] = pipeline.run_batch(ctx, est, batch)
        yield ctx, outcomes


def _silver(ctx, dataset: str, est: str):
    return ctx.spark.read.format("delta").load(ctx.lake.silver(dataset)).where(F.col("establishment_id") == est)


def test_csv_word_answers_land_as_value_as_string(landed):
    ctx, outcomes = landed
    rows = {(r["observation_source_value"], r["value_as_string"], r["value_as_number"], r["value_as_concept"],
             r["category"]) for r in _silver(ctx, "observation", CSV_EST).collect()}
    assert rows == {
        ("72166-2", "Never smoker", None, None, "social-history"), ("93043-8", "Yes", None, None, "survey"),
        ("56799-0", None, None, None, "survey"), ("QALY", None, 43.2, None, None),
        ("72166-2", "Former smoker", None, None, "social-history"), ("93030-5", "No", None, None, "survey"),
        ("93038-8", None, None, None, "survey"), ("DALY", None, 0.5, None, None),
        ("93035-4", "Yes", None, None, None)}
    assert {r[0] for r in _silver(ctx, "lab_result", CSV_EST).select("measurement_source_value").collect()} == \
        {"8302-2", "2339-0", "29463-7"}
    # The dropped answers are counted in the batch log.
    from jobs.stages.batch_queue import ingested_entries

    message = ingested_entries(ctx.lake, CSV_EST, outcomes[CSV_EST]["ingest"]["batch_id"])["observation"]["message"]
    assert "2 free-text part(s) dropped" in message


def test_fhir_coded_answers_land_as_concepts_never_numbers(landed):
    ctx, _ = landed
    observations = {(r["observation_source_value"], r["observation_source_vocabulary"]): r
                    for r in _silver(ctx, "observation", FHIR_EST).collect()}
    smoking = observations[("72166-2", "LOINC")]
    assert (smoking["value_as_concept"], smoking["value_as_number"], smoking["value_as_string"]) == \
        ("SNOMED|266919005", None, None)
    acuity = observations[("363983007", "SNOMED")]
    assert (acuity["value_as_number"], acuity["category"], acuity["unit_source_value"]) == (0.8, "exam", "{ratio}")
    assert observations[("56051-6", "LOINC")]["value_as_concept"] == "LOINC|LA32-8"
    assert observations[("93043-8", "LOINC")]["value_as_string"] == "Yes"
    assert ("56799-0", "LOINC") not in observations  # the free-text address component
    labs = {r["measurement_source_value"]: r for r in _silver(ctx, "lab_result", FHIR_EST).collect()}
    covid = labs["94500-6"]
    assert (covid["value_as_concept"], covid["value_as_number"], covid["value_source_as_number"]) == \
        ("SNOMED|260415000", None, None)
    assert labs["39156-5"]["value_as_concept"] is None and labs["39156-5"]["value_as_number"] == 24.1


@pytest.mark.parametrize("est", [CSV_EST, FHIR_EST])
def test_every_row_read_is_landed_or_quarantined(landed, est):
    ctx, outcomes = landed
    ingest, land = outcomes[est]["ingest"], outcomes[est]["land"]
    for dataset in set(ingest["bronze"]) | set(ingest["quarantined"]):
        read = ingest["bronze"].get(dataset, 0) + ingest["quarantined"].get(dataset, 0)
        assert read == land["landed"].get(dataset, 0) + land["quarantined"].get(dataset, 0) + \
            land["duplicates"].get(dataset, 0), dataset
    assert land["landed"]["observation"] == _silver(ctx, "observation", est).count() > 0
    assert sum(land["quarantined"].values()) == 0
