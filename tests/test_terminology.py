"""Standard concepts derived from configured maps: visit types, conditions, drugs, lab units, checks."""

from __future__ import annotations

import json
import shutil

import pytest
from pyspark.sql import functions as F

from jobs.terminology.concepts import with_concepts
from jobs.terminology.maps import NO_CONCEPT, check_terminology, load_terminology
from tests.conftest import CONFIG_DIR


@pytest.fixture(scope="module")
def terminology():
    return load_terminology(CONFIG_DIR)


def test_fhir_codes_and_csv_words_land_as_one_visit_concept(spark, terminology):
    # Demo-shaped: the FHIR establishment's Encounter.class (AMB, lower-cased at pseudonymise),
    # the CSV establishments' words, one French word through an establishment override.
    rows = ([("centre_fhir", "amb")] * 3 + [("hopital_riviere", "outpatient")] * 5
            + [("cisss_estuaire", "emergency")] * 2
            + [("centre_fhir", "emer")] * 4 + [("chu_laurentides", "externe")] * 2 + [("hopital_riviere", "externe")]
            + [("hopital_riviere", "telepathy")] + [("hopital_riviere", None)])
    encounters = spark.createDataFrame(rows, "establishment_id string, visit_source_value string")
    out = with_concepts(encounters, "encounter", terminology)
    per_concept = {r.visit_concept_id: r["count"] for r in out.groupBy("visit_concept_id").count().collect()}
    assert per_concept == {9202: 3 + 5 + 2, 9203: 2 + 4, 0: 3}
    # Each concept's count is the sum of the source values mapped to it.
    per_source = out.groupBy("visit_concept_id", "visit_source_value").count().collect()
    for concept, total in per_concept.items():
        assert sum(r["count"] for r in per_source if r.visit_concept_id == concept) == total
    maps = {(r.establishment_id, r.visit_source_value): r.visit_concept_map for r in out.distinct().collect()}
    assert maps[("centre_fhir", "amb")] == "visit-type|1"
    assert maps[("chu_laurentides", "externe")] == "visit-type-fr|1"
    assert maps[("hopital_riviere", "externe")] is None  # the override is chu_laurentides' own


def test_conditions_by_rule_and_by_map_and_drugs_by_map(spark, terminology):
    diagnoses = spark.createDataFrame(
        [("e1", "E11.9", "ICD10CA"), ("e1", "I1000", "ICD10CM"), ("e1", "44054006", "SNOMED"),
         ("e1", "230690007", "SNOMED"), ("e1", None, None)],
        "establishment_id string, condition_source_value string, condition_source_vocabulary string")
    got = {r.condition_source_value: (r.condition_concept_code, r.condition_concept_map)
           for r in with_concepts(diagnoses, "diagnosis", terminology).collect()}
    assert got == {"E11.9": ("E11", "rule:icd10-category|1"), "I1000": ("I10", "rule:icd10-category|1"),
                   "44054006": ("E11", "snomed-icd10-category|1"), "230690007": (NO_CONCEPT, None),
                   None: (NO_CONCEPT, None)}
    drugs = spark.createDataFrame(
        [("e1", "A10BA02", "ATC"), ("e1", "02380080", "DIN"), ("e1", "860975", "RxNorm"), ("e1", "A10B", "ATC")],
        "establishment_id string, drug_source_value string, drug_source_vocabulary string")
    got = {r.drug_source_value: r.drug_concept_code for r in with_concepts(drugs, "medication", terminology).collect()}
    assert got == {"A10BA02": "A10BA02", "02380080": "A10BA02", "860975": "A10BA02", "A10B": NO_CONCEPT}


def test_glucose_in_mg_dl_and_mmol_l_lands_in_one_unit_with_equal_values(spark, terminology):
    labs = spark.createDataFrame(
        [("m1", "est_a", "14749-6", 90.0, "mg/dL"), ("m2", "est_b", "14749-6", 4.995667, "mmol/L"),
         ("m3", "est_b", "718-7", 13.5, "g/dL"), ("m4", "est_a", "718-7", 13.5, "furlong"),
         ("m5", "est_a", "1742-6", 40.0, "mg/dL"), ("m6", "est_a", "14749-6", None, None)],
        "measurement_id string, establishment_id string, measurement_source_value string, value_as_number double, "
        "unit_source_value string")
    out = {r.measurement_id: r for r in with_concepts(labs, "lab_result", terminology).collect()}
    assert out["m1"].unit_concept_code == out["m2"].unit_concept_code == "mmol/L"
    assert out["m1"].value_as_number == pytest.approx(out["m2"].value_as_number, rel=1e-6)
    assert (out["m1"].value_source_as_number, out["m1"].unit_source_value) == (90.0, "mg/dL")
    assert out["m3"].value_as_number == pytest.approx(135.0) and out["m3"].unit_concept_code == "g/L"
    assert out["m1"].measurement_concept_map == "units|1"
    # An unknown unit and a unit of the wrong dimension keep their rows with concept 0, no value in the
    # canonical unit, the value as sent kept; a qualitative result has nothing to convert.
    for unconvertible in ("m4", "m5"):
        row = out[unconvertible]
        assert (row.unit_concept_code, row.value_as_number, row.measurement_concept_map) == (NO_CONCEPT, None, None)
        assert row.value_source_as_number is not None
    assert out["m6"].unit_concept_code is None


def test_molar_and_mass_concentrations_convert_only_with_a_declared_molar_mass():
    from jobs.terminology.units import convert

    assert convert("mg/dL", "mmol/L", 180.156).factor == pytest.approx(1 / 18.0156)
    assert convert("mg/dL", "mmol/L") is None
    assert convert("10*3/uL", "10*9/L").factor == pytest.approx(1.0)


def _broken_config(tmp_path, mutate):
    config = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, config)
    path = config / "terminology" / "visit-type.json"
    resource = json.loads(path.read_text(encoding="utf-8"))
    mutate(resource)
    path.write_text(json.dumps(resource), encoding="utf-8")
    return config


OUTPATIENT = {"code": "9202", "equivalence": "equal"}


@pytest.mark.parametrize("mutate, entry, reason", [
    (lambda r: r["group"][1]["element"][0]["target"][0].update(equivalence="samey"),
     "group[1].element[0] (code 'inpatient').target[0]", "unknown equivalence 'samey'"),
    (lambda r: r["group"][1]["element"].append({"code": "Inpatient", "target": [OUTPATIENT]}),
     "group[1].element[4] (code 'Inpatient')", "conflicting entry"),
    (lambda r: r["group"][1]["element"].append({"code": "outpatient", "target": [OUTPATIENT]}),
     "group[1].element[4] (code 'outpatient')", "duplicate entry"),
    (lambda r: r["group"][0].update(source="http://example.org/made-up"), "group[0].source", "cannot map to visit"),
    (lambda r: r["group"][0].update(target="http://snomed.info/sct"), "group[0].target", "target system"),
])
def test_config_check_rejects_a_broken_map_with_file_entry_and_reason(tmp_path, mutate, entry, reason):
    from jobs.core.config import ConfigError, load_consortium

    config = _broken_config(tmp_path, mutate)
    _, problems = check_terminology(config)
    assert any(f == "terminology/visit-type.json" and e == entry and reason in r for f, e, r in problems), problems
    with pytest.raises(ConfigError, match="terminology/visit-type.json"):
        load_consortium(config)


def test_the_shipped_maps_pass_the_check():
    terminology, problems = check_terminology(CONFIG_DIR, {"chu_laurentides", "cisss_estuaire", "hopital_riviere"})
    assert problems == [] and {"gender", "visit", "condition", "drug"} <= {e.domain for e in terminology.entries}


# ------------------------------------------------------------ through land ----

def _changed_visit_map(tmp_path):
    """A copy of the shipped configuration whose visit map (version 2) now maps 'telehealth'."""
    def mutate(resource):
        resource["version"] = "2"
        resource["group"][1]["element"].append(
            {"code": "telehealth", "target": [{"code": "5083", "display": "Telehealth", "equivalence": "equivalent"}]})
    return _broken_config(tmp_path, mutate)


def test_land_derives_concepts_and_a_changed_map_remaps_silver_without_reingest(spark, consortium, tmp_path):
    from jobs.core.lake import Lake
    from jobs.core.ops import read_batch_log
    from jobs.terminology.coverage import coverage
    from jobs.terminology.remap import REMAP_PREFIX, remap_silver
    from tests.test_land import run_batch
    from tests.test_validate import EXTRACTED, enc

    lake = Lake(str(tmp_path / "lake"))
    visits = ([enc(f"o{i}", visit_source_value="outpatient") for i in range(3)]
              + [enc(f"a{i}", visit_source_value="amb") for i in range(2)]
              + [enc(f"t{i}", visit_source_value="telehealth") for i in range(2)])
    run_batch(spark, lake, consortium, "b1", {"encounter": visits}, EXTRACTED, kind="full")
    silver = spark.read.format("delta").load(lake.silver("encounter"))
    assert {(r.visit_source_value, r.visit_concept_id, r.visit_concept_map) for r in silver.collect()} == {
        ("outpatient", 9202, "visit-type|1"), ("amb", 9202, "visit-type|1"), ("telehealth", 0, None)}
    (before,) = coverage(silver, "encounter", min_cell_size=2)
    assert (before.rows, before.rows_mapped, before.values, before.values_mapped) == (7, 5, 3, 2)
    assert before.unmapped == (("telehealth", 2),)
    extracted = {r.visit_occurrence_id: r._extracted_at for r in silver.collect()}
    log_rows = read_batch_log(spark, lake).count()

    changed = load_terminology(_changed_visit_map(tmp_path))
    assert remap_silver(spark, lake, changed, ("encounter",)) == {"encounter": 7}  # the map's version changed
    silver = spark.read.format("delta").load(lake.silver("encounter"))
    assert {(r.visit_source_value, r.visit_concept_id, r.visit_concept_map) for r in silver.collect()} == {
        ("outpatient", 9202, "visit-type|2"), ("amb", 9202, "visit-type|2"), ("telehealth", 5083, "visit-type|2")}
    # Only the concept columns changed: the records' extraction instants stay, nothing was ingested again.
    assert {r.visit_occurrence_id: r._extracted_at for r in silver.collect()} == extracted
    assert read_batch_log(spark, lake).count() == log_rows
    last = spark.sql(f"DESCRIBE HISTORY delta.`{lake.silver('encounter')}`").orderBy(F.col("version").desc()).first()
    assert last.operation == "MERGE" and last.userMetadata.startswith(REMAP_PREFIX)
    assert "visit-type|2" in last.userMetadata and last.operationMetrics["numTargetRowsUpdated"] == "7"
    # Applied again, the same maps change nothing and commit nothing.
    version = last.version
    assert remap_silver(spark, lake, changed, ("encounter",)) == {"encounter": 0}
    assert spark.sql(f"DESCRIBE HISTORY delta.`{lake.silver('encounter')}`").agg(F.max("version")).first()[0] == version


def test_a_batch_whose_mapped_share_is_under_the_threshold_stops(spark, consortium, tmp_path):
    import dataclasses

    from jobs.core.batchlog import BatchRejected
    from jobs.core.lake import Lake
    from jobs.stages.validate import validate_batch
    from tests.test_validate import EST, EXTRACTED, enc, stage_batch

    from jobs.core.config import BatchRuleOverride

    rules = consortium.pipeline.batch_rules.model_copy(
        update={"datasets": {"encounter": BatchRuleOverride(min_mapped_pct=90)}})
    strict = dataclasses.replace(consortium, pipeline=consortium.pipeline.model_copy(update={"batch_rules": rules}))
    lake = Lake(str(tmp_path / "lake"))
    visits = [enc(f"o{i}", visit_source_value="outpatient") for i in range(16)] + [
        enc(f"x{i}", visit_source_value="day_surgery") for i in range(4)]
    stage_batch(spark, lake, "b1", {"encounter": visits}, EXTRACTED)
    with pytest.raises(BatchRejected, match="batch.mapped_share"):
        validate_batch(spark, lake, strict, EST, "b1", "full")
    results = (spark.read.format("delta").load(lake.ops("validation_results"))
               .where(F.col("rule") == "batch.mapped_share"))
    (row,) = results.collect()
    assert (row.success, row.unexpected_count, row.element_count) == (False, 4, 20)
    assert json.loads(row.observed)["rows_mapped_pct"] == 80.0


def test_the_demo_query_counts_one_row_per_visit_concept_across_establishments(tmp_path):
    """Through the gateway: the FHIR establishment's AMB and the CSV establishments' words are one row."""
    import pyarrow as pa
    from deltalake import write_deltalake
    from fastapi.testclient import TestClient

    from jobs.research.gateway.app import create_app
    from jobs.research.gateway.demo import DEMO_PROJECT, DEMO_MEMBER, DEMO_SQL
    from jobs.research.gateway.server import GatewaySettings
    from jobs.research.gateway.tokens import TokenStore
    from jobs.core.lake import Lake

    lake = Lake(str(tmp_path / "lake"))
    # 300 persons with 10 visits each (the project's bound on rows per person): 2,000 outpatient visits
    # sent as 'outpatient' (CSV) and 'amb' (FHIR), 1,000 emergency visits sent as 'emergency' and 'emer'.
    senders = ([("chu_laurentides", "outpatient", 9202)] * 100 + [("centre_fhir", "amb", 9202)] * 100
               + [("hopital_riviere", "emergency", 9203)] * 50 + [("centre_fhir", "emer", 9203)] * 50)
    sent = [(p, e, v, c) for p, (e, v, c) in enumerate(senders) for _ in range(10)]
    write_deltalake(lake.project(DEMO_PROJECT, "encounter"), pa.table({
        "visit_occurrence_id": [f"v{i:04d}" for i in range(len(sent))],
        "person_id": [f"p{p:03d}" for p, _, _, _ in sent],
        "establishment_id": [e for _, e, _, _ in sent], "visit_source_value": [v for _, _, v, _ in sent],
        "visit_concept_id": pa.array([c for _, _, _, c in sent], pa.int32())}))
    settings = GatewaySettings.from_env(lake_root=lake.root, config_dir=CONFIG_DIR,
                                        token_store=tmp_path / "tokens.jsonl")
    token = TokenStore(settings.token_store).issue(DEMO_PROJECT, DEMO_MEMBER)[0]
    answer = TestClient(create_app(settings)).post(f"/v1/projects/{DEMO_PROJECT}/query", json={"sql": DEMO_SQL},
                                                   headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    rows = {r[0]: dict(zip(body["columns"], r)) for r in body["rows"]}
    # One row per declared visit concept (the project's public keys), none per source value.
    assert sorted(rows) == [0, 9201, 9202, 9203]
    for concept, truth in ((9202, 2000), (9203, 1000)):
        row = rows[concept]
        half_width = row["visits_high95"] - row["visits"]
        # Differentially private: the released count is noisy; three times its 95 % half-width fails
        # with a probability of about 1e-4 (Laplace tails), so this checks the pooling, not the noise.
        assert abs(row["visits"] - truth) <= 3 * half_width, (concept, row)


def test_the_ucum_definitions_cache_is_a_folder_of_the_user_s_own_closed_to_others(tmp_path):
    """pint loads pickles from it: a folder others may write to is not used (the registry is built without it)."""
    from jobs.terminology import units

    from jobs.core.settings import PROJECT_ROOT

    assert units._definitions_cache() == PROJECT_ROOT / ".cache" / "pint"  # ignored by git, beside the jars
    folder = units._definitions_cache(tmp_path / "pint")
    assert folder == tmp_path / "pint"
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)
    assert units._definitions_cache(tmp_path / "pint") is None
