import shutil

import pytest
import yaml

from jobs.app.cli import main
from jobs.core.config import ConfigError, load_consortium
from tests.conftest import CONFIG_DIR


@pytest.fixture()
def config(tmp_path):
    root = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, root)
    return root


def _edit(path, change):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")


def test_the_shipped_configuration_is_valid(capsys):
    assert main(["config", "check"]) == 0
    assert "3 establishments" in capsys.readouterr().out


MISTAKES = [
    ("establishments/chu_laurentides.yaml", lambda d: d["input"].update(encoding="ebcdic"),
     "input.encoding", "unsupported encoding 'ebcdic'"),
    ("establishments/chu_laurentides.yaml", lambda d: d["input"]["columns"]["patient"].update(nom="surname"),
     "input.columns", "unknown canonical column(s) ['surname']"),
    ("establishments/chu_laurentides.yaml", lambda d: d["input"]["columns"].update(imaging={"x": "y"}),
     "input.columns", "unknown dataset 'imaging'"),
    ("establishments/chu_laurentides.yaml", lambda d: d["input"]["columns"]["patient"].pop("action"),
     "input.columns.patient", "no source for the required column record_action"),
    ("establishments/chu_laurentides.yaml", lambda d: d["input"].pop("delimiter"),
     "input.delimiter", "Field required"),
    ("establishments/hopital_riviere.yaml", lambda d: d.update(id="other_id"), "id", "differs from the file name"),
    ("establishments/cisss_estuaire.yaml", lambda d: d["input"]["purpose_codes"].update({"x|y": "marketing"}),
     "input.purpose_codes.x|y", "unknown purpose 'marketing'"),
    ("purposes.yaml", lambda d: d["purposes"][0].update(regime="maybe"), "purposes[0].regime", "Input should be"),
    ("agreements.yaml", lambda d: d["agreements"][0].update(establishment="nowhere"),
     "agreements[0].establishment", "unknown establishment 'nowhere'"),
    ("agreements.yaml", lambda d: d["agreements"][1]["purposes"].append("marketing"),
     "agreements[1].purposes", "unknown purpose 'marketing'"),
    ("projects/diabetes_outcomes.yaml", lambda d: d.update(valid_until="2020-01-01"), "-", "is before valid_from"),
    ("projects/diabetes_outcomes.yaml", lambda d: d["datasets"]["patient"].append("nam"),
     "datasets.patient", "unknown column 'nam'"),
    ("projects/diabetes_outcomes.yaml", lambda d: d["datasets"].update(imaging=["person_id"]),
     "datasets.imaging", "unknown dataset 'imaging'"),
    ("projects/diabetes_outcomes.yaml", lambda d: d.update(min_cell_size=3), "min_cell_size", "greater than or equal to 11"),
    ("projects/oncology_cohort.yaml", lambda d: d.update(purpose="marketing"), "purpose", "unknown purpose 'marketing'"),
    ("projects/oncology_cohort.yaml", lambda d: d["establishments"].append("nowhere"),
     "establishments", "unknown establishment 'nowhere'"),
    ("pipeline.yaml", lambda d: d["batch_rules"].update(max_quarantined_pct=140),
     "batch_rules.max_quarantined_pct", "less than or equal to 100"),
    ("pipeline.yaml", lambda d: d["batch_rules"].update(datasets={"imaging": {"max_quarantined_pct": 5}}),
     "batch_rules.datasets", "unknown dataset(s) ['imaging']"),
    ("pipeline.yaml", lambda d: d.update(transient_retention_days=120), "-", "exceeds bronze_retention_days"),
    ("establishments/chu_laurentides.yaml", lambda d: d.update(batch_rules={"max_quarantined_pct": -1}),
     "batch_rules.max_quarantined_pct", "greater than or equal to 0"),
    ("establishments/chu_laurentides.yaml",
     lambda d: d.update(batch_rules={"datasets": {"lab_result": {"max_quarantine_pct": 40}}}),
     "batch_rules.datasets.lab_result.max_quarantine_pct", "Extra inputs are not permitted"),
    ("establishments/chu_laurentides.yaml", lambda d: d["input"]["columns"]["lab_result"].pop("no_resultat"),
     "input.columns.lab_result", "no source for the required column lab_result_ref"),
    ("establishments/chu_laurentides.yaml", lambda d: d["input"].update(derived_ids={"lab_result": ["no_dossier"]}),
     "input.derived_ids.lab_result", "a header already maps to lab_result_ref"),
    ("establishments/hopital_riviere.yaml", lambda d: d["input"].update(derived_ids={"imaging": ["x"]}),
     "input.derived_ids.imaging", "the dataset has no mapping under columns"),
    ("establishments/chu_laurentides.yaml",
     lambda d: d["input"].update(constants={"diagnosis": {"condition_system": "SNOMED"}}),
     "input.constants.diagnosis.condition_system", "a header already maps to it"),
    ("establishments/chu_laurentides.yaml", lambda d: d["input"].update(person_identifiers={"mpi_x": "no_mpi"}),
     "input.person_identifiers.mpi_x", "unknown person-identifier system"),
    ("establishments/cisss_estuaire.yaml",
     lambda d: d["input"].update(identifier_systems={"passport": ["urn:x"]}),
     "input.identifier_systems.passport", "unknown person-identifier system"),
    ("pipeline.yaml", lambda d: d["person_identifiers"][1].update(pattern="[0-9"),
     "person_identifiers.1.pattern", "not a regular expression"),
    ("pipeline.yaml", lambda d: d["person_identifiers"].append({"id": "nam"}),
     "person_identifiers", "declared twice"),
]


@pytest.mark.parametrize("file, change, key, reason", MISTAKES, ids=[m[3][:40] for m in MISTAKES])
def test_each_kind_of_mistake_names_file_key_and_reason(config, capsys, file, change, key, reason):
    _edit(config / file, change)
    with pytest.raises(ConfigError) as caught:
        load_consortium(config)
    assert any(p.file == file and p.key == key and reason in p.reason for p in caught.value.problems), \
        caught.value.problems
    assert main(["config", "check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{file}: {key}: " in err and reason in err


def test_yaml_syntax_error_names_the_line(config):
    (config / "purposes.yaml").write_text("purposes:\n  - id: x\n   regime: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_consortium(config)
    problem = caught.value.problems[0]
    assert problem.file == "purposes.yaml" and problem.key.startswith("line ") and "not valid YAML" in problem.reason


def test_batch_rules_apply_from_the_consortium_down_to_one_dataset_of_one_establishment(config):
    _edit(config / "pipeline.yaml", lambda d: d["batch_rules"].update(
        max_quarantined_pct=20, datasets={"lab_result": {"max_quarantined_pct": 25, "max_row_count_drop_pct": 60}}))
    _edit(config / "establishments" / "chu_laurentides.yaml", lambda d: d.update(batch_rules={
        "max_quarantined_pct": 40, "allow_column_changes": True,
        "datasets": {"lab_result": {"max_quarantined_pct": 70}}}))
    consortium = load_consortium(config)

    def rules(est, dataset):
        r = consortium.batch_rules(est, dataset)
        return r.max_quarantined_pct, r.max_row_count_drop_pct, r.allow_column_changes

    assert rules("hopital_riviere", "patient") == (20, 50, False)  # the consortium's
    assert rules("hopital_riviere", "lab_result") == (25, 60, False)  # its per-dataset line
    assert rules("chu_laurentides", "patient") == (40, 50, True)  # the establishment's, over the consortium's
    assert rules("chu_laurentides", "lab_result") == (70, 60, True)  # the establishment's dataset line, last
