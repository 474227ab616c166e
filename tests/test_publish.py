"""Publish: consent-filtered, unlinkable project extracts, gold with suppression, fail-closed policy."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import shutil
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from jobs.core.config import ConfigError, Project, load_consortium
from jobs.stages.gold import PATIENTS_BY_CONDITION, suppress_small_cells
from jobs.core.lake import Lake
from jobs.privacy.policy import PolicyError
from jobs.stages.publish import MANIFEST, publish
from jobs.core.schemas import SILVER_SCHEMAS
from tests.terminology_helpers import silver_frame

from tests.conftest import CONFIG_DIR, TEST_KEY

D = dt.date
A, B, C = "chu_laurentides", "hopital_riviere", "cisss_estuaire"
GEN, ONC = "research_general", "research_oncology"
EXTRACTED = dt.datetime(2026, 1, 1)
FIRST = D(2026, 6, 1)
PERSONS = 40
GROUPS = {"E11.9": "diabetes", "C50.9": "oncology", "J45.9": "respiratory"}
IDENTIFIERS = {"person_id", "visit_occurrence_id", "condition_occurrence_id", "measurement_id", "drug_exposure_id"}


def hmac_hex(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def person(i: int) -> str:
    return f"person-{i:02d}-" + "0" * 20


def build_history():
    """Forty persons across three establishments; some seen at two."""
    home = {i: (A, B, C)[i % 3] for i in range(PERSONS)}
    rows = defaultdict(list)
    for i in range(PERSONS):
        sites = [home[i]] + ([B] if i % 5 == 0 and home[i] != B else [])
        prefix = "H2X" if i < 20 else "G1R"
        for est in sites:
            rows["patient"].append((person(i), est, f"pk-{i}-{est}", "nam", "female" if i % 2 else "male",
                                    1950 + i, 1 + i % 12, prefix, False, "b1", EXTRACTED))
            enc = f"enc-{i}-{est}"
            start = dt.datetime(2025, 3 + i % 9, 1 + i % 27, 10, 30)
            rows["encounter"].append((enc, person(i), est, start.date(), start, start.date(), start, "inpatient",
                                      "site", "b1", EXTRACTED))
            code = "E11.9" if i < 34 else ("C50.9" if i < 37 else "J45.9")
            rows["diagnosis"].append((f"dx-{i}-{est}", person(i), est, enc, D(2025, 1 + i % 12, 15), code,
                                      "ICD10CA", "confirmed", "b1", EXTRACTED))
            rows["lab_result"].append((f"lab-{i}-{est}", person(i), est, enc, D(2025, 5, 2), start, "4548-4",
                                       "LOINC", 7.1, "7.1", "%", "b1", EXTRACTED))
            rows["medication"].append((f"med-{i}-{est}", person(i), est, enc, D(2025, 4, 10), D(2025, 7, 10),
                                       "A10BA02", "ATC", 500.0, "mg", "oral", "b1", EXTRACTED))
    consent = []
    for i in range(3):  # refuse general research
        consent.append((person(i), A, GEN, "deny", D(2025, 1, 1), None, None))
    for i in range(0, 15):  # explicit oncology consent
        consent.append((person(i), home[i], ONC, "permit", D(2025, 1, 1), None, None))
    consent.append((person(14), B, ONC, "withdraw", D(2026, 5, 1), None, None))
    rows["consent"] = [(f"c-{n}", p, est, purp, dec, when, vf, vu, "b1", EXTRACTED)
                       for n, (p, est, purp, dec, when, vf, vu) in enumerate(consent)]
    return rows, home


def write_silver(spark, lake: Lake, rows) -> None:
    for dataset, data in rows.items():
        silver_frame(spark, dataset, data).write.format("delta").mode("overwrite").save(lake.silver(dataset))


def config_copy(tmp: Path, tweak=None) -> Path:
    root = tmp / "config"
    shutil.copytree(CONFIG_DIR, root)
    onc = root / "projects" / "oncology_cohort.yaml"
    data = yaml.safe_load(onc.read_text())
    data["establishments"] = [A, B, C]  # C shares nothing for oncology: must not appear
    onc.write_text(yaml.safe_dump(data))
    if tweak:
        tweak(root)
    return root


def read(spark, path):
    return spark.read.format("delta").load(path)


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory, pseudonym_key_module):
    tmp = tmp_path_factory.mktemp("publish")
    consortium = load_consortium(config_copy(tmp))
    lake = Lake(str(tmp / "lake"))
    rows, home = build_history()
    write_silver(spark, lake, rows)
    outcome = publish(spark, lake, consortium, pseudonym_key_module, FIRST)
    return {"consortium": consortium, "lake": lake, "rows": rows, "home": home, "outcome": outcome,
            "key": pseudonym_key_module, "tmp": tmp}


@pytest.fixture(scope="module")
def pseudonym_key_module():
    from jobs.privacy.keys import load_key


    return load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)


def consenting(rows, purpose, regime, on):
    """Allowed persons, recomputed in plain Python from the consent rows."""
    from tests.test_consent import expected_allowed

    history = [(p, est, purp, dec, when, vf, vu) for _, p, est, purp, dec, when, vf, vu, _, _ in rows["consent"]]
    patients = sorted({r[0] for r in rows["patient"]})
    return expected_allowed(history, patients, purpose, regime, on)


def expected_ids(world, project: Project, dataset: str, id_column: str, on: dt.date) -> set[str]:
    consortium, rows = world["consortium"], world["rows"]
    regime = consortium.purposes[project.purpose].regime
    allowed = consenting(rows, project.purpose, regime, on)
    shared = {e for e in project.establishments
              if dataset in consortium.agreement_for(e).datasets and project.purpose in consortium.agreement_for(e).purposes}
    names = SILVER_SCHEMAS[dataset].fieldNames()
    pid, est, rid = names.index("person_id"), names.index("establishment_id"), names.index(id_column)
    key = world["key"].project_key(project.id)
    return {hmac_hex(key, r[rid]) for r in rows[dataset] if r[pid] in allowed and r[est] in shared}


def test_extracts_hold_only_consenting_persons_of_sharing_establishments(spark, world):
    lake, consortium = world["lake"], world["consortium"]
    checks = {"diabetes_outcomes": {"encounter": "visit_occurrence_id", "diagnosis": "condition_occurrence_id",
                                    "lab_result": "measurement_id", "patient": "person_id"},
              "oncology_cohort": {"diagnosis": "condition_occurrence_id", "medication": "drug_exposure_id",
                                  "patient": "person_id"}}
    for project_id, datasets in checks.items():
        project = consortium.projects[project_id]
        for dataset, id_column in datasets.items():
            got = {r[0] for r in read(spark, lake.project(project_id, dataset)).select(id_column).collect()}
            assert got == expected_ids(world, project, dataset, id_column, FIRST), (project_id, dataset)
    onc_patients = read(spark, lake.project("oncology_cohort", "patient")).collect()
    onc_persons = {r.person_id for r in onc_patients}
    # Persons 0-13 consented (14 withdrew); 2, 8 and 11 are seen only at C, which shares nothing for oncology.
    assert len(onc_persons) == 11
    assert world["outcome"].extracts["oncology_cohort"]["patient"] == len(onc_patients) == 12  # person 0: A and B


def test_extracts_have_only_allowed_columns(spark, world):
    lake = world["lake"]
    for project in world["consortium"].projects.values():
        for dataset, columns in project.datasets.items():
            assert read(spark, lake.project(project.id, dataset)).columns == columns


def test_two_projects_share_no_identifier_and_no_silver_pseudonym(spark, world):
    lake = world["lake"]
    silver_ids = {v for rows in world["rows"].values() for r in rows for v in r if isinstance(v, str)}
    seen = {}
    for project in world["consortium"].projects.values():
        values = set()
        for dataset, columns in project.datasets.items():
            for row in read(spark, lake.project(project.id, dataset)).select(
                    *[c for c in columns if c in IDENTIFIERS]).collect():
                values |= set(row)
        assert values and not values & silver_ids
        seen[project.id] = values
    assert not seen["diabetes_outcomes"] & seen["oncology_cohort"]


def test_dates_are_coarsened_or_shifted_per_person(spark, world):
    lake, rows, key = world["lake"], world["rows"], world["key"]
    visits = read(spark, lake.project("diabetes_outcomes", "encounter")).collect()
    assert visits and all(v.visit_start_date.day == 1 and v.visit_end_date.day == 1 for v in visits)
    # Shifted: same offset for every event of a person, never 0, at most a year.
    onc = world["consortium"].projects["oncology_cohort"]
    okey = key.project_key(onc.id)
    real = {hmac_hex(okey, r[0]): r[4] for r in rows["diagnosis"]}
    real_med = {hmac_hex(okey, r[0]): (r[4], r[5]) for r in rows["medication"]}
    offsets = defaultdict(set)
    for r in read(spark, lake.project(onc.id, "diagnosis")).collect():
        offsets[r.person_id].add((r.condition_start_date - real[r.condition_occurrence_id]).days)
    for r in read(spark, lake.project(onc.id, "medication")).collect():
        start, end = real_med[r.drug_exposure_id]
        offsets[r.person_id] |= {(r.drug_exposure_start_date - start).days, (r.drug_exposure_end_date - end).days}
    assert offsets and all(len(v) == 1 for v in offsets.values())
    assert all(0 < abs(next(iter(v))) <= 365 for v in offsets.values())
    assert len({next(iter(v)) for v in offsets.values()}) > 1
    births = {r.year_of_birth for r in read(spark, lake.project(onc.id, "patient")).collect()} - {None}
    # Year of birth is never shifted: published as exact or as the first year of its band.
    assert births and births <= {r[5] for r in rows["patient"]}


def test_manifest_records_policy_versions_and_counts(spark, world):
    lake, outcome = world["lake"], world["outcome"]
    m = read(spark, lake.project("diabetes_outcomes", MANIFEST)).collect()
    assert len(m) == 1
    assert m[0].policy_version == world["consortium"].policy_version
    # Every silver table at its version; this world delivers no observations, so that table does not exist.
    assert m[0].silver_versions == {d: 0 for d in SILVER_SCHEMAS if d != "observation"}
    assert m[0].row_counts == outcome.extracts["diabetes_outcomes"]
    assert m[0].establishments["lab_result"] == sorted([A, B, C])
    assert m[0].key_fingerprint == world["key"].fingerprint


def test_patient_extracts_are_k_anonymous_with_figures_in_the_manifest(spark, world):
    lake, rows = world["lake"], world["rows"]
    for project in world["consortium"].projects.values():
        qis = [q for q in project.quasi_identifiers if q in project.datasets["patient"]]
        patients = read(spark, lake.project(project.id, "patient")).collect()
        per_person = {r.person_id: tuple(r[q] for q in qis) for r in patients}
        sizes = Counter(per_person.values())
        assert min(sizes.values()) >= project.k_anonymity, (project.id, sizes)
        m = read(spark, lake.project(project.id, MANIFEST)).orderBy("published_at").collect()[0]
        figures = m.k_anonymity
        assert figures["k"] == project.k_anonymity and figures["persons"] == len(per_person)
        suppressed = sum(1 for values in per_person.values() if all(v is None for v in values))
        assert figures["suppressed"] == suppressed
        assert figures["generalised"] == (len(per_person) - suppressed if figures["level"] > 0 else 0)
        assert figures["smallest_class"] == min(sizes.values())
        years = {values[qis.index("year_of_birth")] for values in per_person.values()} - {None}
        assert all(y % figures["year_band"] == 0 for y in years)
        risk = m.reidentification_risk
        assert risk["unique_on_quasi_identifiers"] == 0.0
        assert 0.0 <= risk["unique_with_diagnoses"] <= 1.0
    # Real years of birth are all distinct in this silver: some generalisation was needed.
    assert len({r[5] for r in rows["patient"]}) == PERSONS


def _signatures(spark, lake, project_id: str, columns: tuple[str, ...]) -> dict[str, tuple]:
    """Per project pseudonym: the published values of ``columns`` and the set of diagnosis codes."""
    codes = defaultdict(set)
    for r in read(spark, lake.project(project_id, "diagnosis")).collect():
        codes[r.person_id].add(r.condition_source_value)
    return {r.person_id: tuple(r[c] for c in columns) + (frozenset(codes[r.person_id]),)
            for r in read(spark, lake.project(project_id, "patient")).collect()}


def _linked(left: dict, right: dict, width: int) -> int:
    """Persons unique in both extracts on the first ``width`` fields of their signature: linked one to one."""
    def uniques(signatures):
        counts = Counter(s[:width] for s in signatures.values())
        return {s for s, n in counts.items() if n == 1}
    return len(uniques(left) & uniques(right))


def _raw_signatures(world, project_id: str, published: dict[str, tuple]) -> dict[str, tuple]:
    """The same persons' signatures had their silver sex and year of birth been published as they are."""
    rows, key = world["rows"], world["key"].project_key(project_id)
    codes = defaultdict(set)
    for r in rows["diagnosis"]:
        codes[r[1]].add(r[5])
    return {r[0]: (r[4], r[5], frozenset(codes[r[0]])) for r in rows["patient"] if hmac_hex(key, r[0]) in published}


def test_cross_project_linkage_on_demographics_and_diagnoses(spark, world):
    lake = world["lake"]
    a = _signatures(spark, lake, "diabetes_outcomes", ("gender_source_value", "year_of_birth"))
    b = _signatures(spark, lake, "oncology_cohort", ("gender_source_value", "year_of_birth"))
    before = _linked(_raw_signatures(world, "diabetes_outcomes", a), _raw_signatures(world, "oncology_cohort", b), 3)
    on_demographics = _linked(a, b, 2)
    with_diagnoses = _linked(a, b, 3)
    print(f"\ncross-project linkage of {len(b)} persons: {before} linked on (sex, year of birth, diagnosis codes) "
          f"without k-anonymity; {on_demographics} on (sex, year of birth) and {with_diagnoses} on (sex, year of "
          "birth, diagnosis codes) in the published extracts")
    assert before > 0  # every year of birth is unique in this silver
    assert on_demographics == 0
    assert with_diagnoses < before


def _published_sets(spark, lake, project: Project, level: int, kinds: set[str]):
    """Per project pseudonym: demographics and the set of published codes (of ``kinds``) taken to ``level``."""
    from jobs.privacy.relink import CODE_LEVELS

    icd, atc = CODE_LEVELS[level]
    sets = defaultdict(set)
    for dataset, column, kind, keep in (("diagnosis", "condition_source_value", "dx", icd),
                                        ("medication", "drug_source_value", "rx", atc)):
        if kind in kinds and dataset in project.datasets:
            for r in read(spark, lake.project(project.id, dataset)).collect():
                code = r[column]
                if code is not None:
                    sets[r.person_id].add(f"{kind}:{code if keep is None else code.replace('.', '')[:keep]}")
    return sets


def test_no_person_is_re_linked_to_fewer_than_k_of_another_extract(spark, world):
    lake, projects = world["lake"], world["consortium"].projects
    manifests = {p: read(spark, lake.project(p, MANIFEST)).orderBy("published_at").collect()[-1] for p in projects}
    for p, m in manifests.items():
        f = m.relink_risk
        assert f["k"] == 5 and f["m"] == 2, p  # the consortium's defaults (config/pipeline.yaml)
        assert f["unique_on_m_codes_after"] == 0 and f["relinked_under_k_after"] == 0, (p, f)
        assert {"unique_on_m_codes_before", "relinked_unique_before", "items", "items_suppressed"} <= set(f), p
    # C50.9 and J45.9 are held by three persons each: rare at k = 5, suppressed (their rows stay, code null).
    diabetes = manifests["diabetes_outcomes"].relink_risk
    assert diabetes["unique_on_m_codes_before"] > 0 and diabetes["items_suppressed"] > 0
    codes = {r.condition_source_value for r in read(spark, lake.project("diabetes_outcomes", "diagnosis")).collect()}
    assert "C50.9" not in codes and None in codes

    dia, onc_p = projects["diabetes_outcomes"], projects["oncology_cohort"]
    level = max(int(manifests[p].relink_risk["code_level"]) for p in projects)
    band = max(manifests[p].k_anonymity["year_band"] for p in projects)
    demo = {p.id: {r.person_id: (r.gender_source_value, r.year_of_birth)
                   for r in read(spark, lake.project(p.id, "patient")).collect()} for p in (dia, onc_p)}
    sets = {p.id: _published_sets(spark, lake, p, level, {"dx"}) for p in (dia, onc_p)}

    def compatible(a, b):
        return all(x is None or y is None or x == y
                   for x, y in ((a[0], b[0]), (a[1] and a[1] // band, b[1] and b[1] // band)))

    for mine, theirs in ((onc_p.id, dia.id), (dia.id, onc_p.id)):
        for person, codes in sets[mine].items():
            n = sum(1 for other, their in sets[theirs].items()
                    if their == codes and compatible(demo[mine][person], demo[theirs][other]))
            assert n == 0 or n >= 5, (mine, person, n)


def test_a_project_whose_bound_cannot_be_met_is_refused_at_publish(spark, world, tmp_path):
    from jobs.privacy.relink import RelinkRiskExceeded

    def strict(root):
        onc = root / "projects" / "oncology_cohort.yaml"
        data = yaml.safe_load(onc.read_text())
        data["relink_risk"] = {"k": 40, "max_suppressed": 0.0}
        onc.write_text(yaml.safe_dump(data))

    consortium = load_consortium(config_copy(tmp_path, strict))
    assert consortium.projects["oncology_cohort"].relink_risk.k == 40
    lake = Lake(str(tmp_path / "lake"))
    shutil.copytree(world["lake"].root, lake.root)  # oncology_cohort has an extract from an earlier publish
    with pytest.raises(RelinkRiskExceeded, match="project oncology_cohort: its extract cannot meet its bound") as exc:
        publish(spark, lake, consortium, world["key"], FIRST)
    assert "k=40" in str(exc.value) and "relink_risk" in str(exc.value)  # the steward sees why and what to change
    assert set(exc.value.outcome.refused) == {"oncology_cohort"}
    assert not Path(lake.project("oncology_cohort")).exists()  # not published, the earlier extract removed
    assert set(exc.value.outcome.extracts) == {"diabetes_outcomes"}


def test_a_bound_out_of_range_stops_loading(tmp_path):
    def bad(root):
        onc = root / "projects" / "oncology_cohort.yaml"
        data = yaml.safe_load(onc.read_text())
        data["relink_risk"] = {"k": 1, "m": 7}
        onc.write_text(yaml.safe_dump(data))

    with pytest.raises(ConfigError, match="relink_risk"):
        load_consortium(config_copy(tmp_path, bad))


def assert_suppression_holds(cells, dims, threshold):
    for cell in cells:
        assert cell["suppressed"] or cell["n"] >= threshold
        assert (cell["n"] is None) == cell["suppressed"]
    for line in combinations(dims, len(dims) - 1):
        groups = defaultdict(list)
        for cell in cells:
            groups[tuple(cell[d] for d in line)].append(cell)
        for members in groups.values():
            hidden = sum(c["suppressed"] for c in members)
            assert hidden != 1 or len(members) == 1, (line, members)


def test_gold_counts_consenting_persons_with_suppression(spark, world):
    lake, rows = world["lake"], world["rows"]
    cells = [r.asDict() | {"n": r.patients} for r in read(spark, lake.gold(PATIENTS_BY_CONDITION)).collect()]
    assert_suppression_holds(cells, ("condition_group", "postal_prefix", "year"), 11)
    allowed = consenting(rows, GEN, "opt_out", FIRST)
    prefix = {r[0]: r[7] for r in rows["patient"]}
    persons = defaultdict(set)
    for r in rows["diagnosis"]:
        if r[1] in allowed:
            persons[(GROUPS[r[5]], prefix[r[1]], r[4].year)].add(r[1])
    expected = {cell: len(who) for cell, who in persons.items()}
    got = {(c["condition_group"], c["postal_prefix"], c["year"]): c for c in cells}
    assert set(got) == set(expected)
    assert expected[("diabetes", "H2X", 2025)] == 17  # 20 persons, 3 of whom refused general research
    for cell, n in expected.items():
        assert got[cell]["suppressed"] or got[cell]["n"] == n
        assert n >= 11 or got[cell]["suppressed"]
    assert not got[("diabetes", "H2X", 2025)]["suppressed"]


def test_secondary_suppression_on_a_small_cube(spark):
    dims = ("g", "p", "y")
    data = [("a", "x", 2025, 30), ("a", "y", 2025, 4), ("a", "z", 2025, 25), ("b", "x", 2025, 12),
            ("b", "y", 2025, 40), ("b", "z", 2025, 13), ("a", "x", 2024, 50), ("c", "q", 2024, 3)]
    cells = spark.createDataFrame(data, "g string, p string, y int, n long")
    out = [r.asDict() for r in suppress_small_cells(cells, 11, dims, "n").collect()]
    assert_suppression_holds(out, dims, 11)
    hidden = {(c["g"], c["p"], c["y"]) for c in out if c["suppressed"]}
    assert ("a", "y", 2025) in hidden and len(hidden) >= 3


def test_withdrawal_removes_the_person_from_every_extract_at_next_publish(spark, world):
    lake, rows, key = world["lake"], world["rows"], world["key"]
    victim = person(4)  # consented to both purposes
    assert hmac_hex(key.project_key("oncology_cohort"), victim) in {
        r.person_id for r in read(spark, lake.project("oncology_cohort", "patient")).collect()}
    rows["consent"].append(("c-late", victim, C, None, "withdraw", D(2026, 6, 10), None, None, "b2", EXTRACTED))
    spark.createDataFrame([rows["consent"][-1]], SILVER_SCHEMAS["consent"]).write.format("delta").mode(
        "append").save(lake.silver("consent"))
    publish(spark, lake, world["consortium"], key, D(2026, 6, 15))
    for project in world["consortium"].projects.values():
        pseudonym = hmac_hex(key.project_key(project.id), victim)
        for dataset in project.datasets:
            assert pseudonym not in {r.person_id for r in read(spark, lake.project(project.id, dataset))
                                     .select("person_id").collect()}, (project.id, dataset)
    manifest = read(spark, lake.project("diabetes_outcomes", MANIFEST)).orderBy("published_at").collect()
    assert manifest[-1].silver_versions["consent"] == 1


def test_expired_project_loses_its_extract(spark, world):
    lake = world["lake"]
    outcome = publish(spark, lake, world["consortium"], world["key"], D(2028, 1, 1))
    assert outcome.removed == ("oncology_cohort",)
    assert not Path(lake.project("oncology_cohort")).exists()
    assert Path(lake.project("diabetes_outcomes", "encounter")).exists()


def test_invalid_or_changed_policy_stops_publishing(spark, world, tmp_path):
    lake, key = world["lake"], world["key"]
    root = config_copy(tmp_path)
    consortium = load_consortium(root)
    bad = dataclasses.replace(consortium, projects=consortium.projects | {
        "diabetes_outcomes": consortium.projects["diabetes_outcomes"].model_copy(update={"purpose": "marketing"})})
    with pytest.raises(ConfigError, match="unknown purpose"):
        publish(spark, lake, bad, key, FIRST)

    onc = root / "projects" / "oncology_cohort.yaml"
    data = yaml.safe_load(onc.read_text())
    data["datasets"]["patient"].append("nam")
    onc.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="unknown column 'nam'"):
        publish(spark, lake, consortium, key, FIRST)

    data["datasets"]["patient"].remove("nam")
    data["members"].append("mallory")
    onc.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError, match="changed since it was loaded"):
        publish(spark, lake, consortium, key, FIRST)


def test_a_changed_concept_map_reaches_the_extract_without_reingest(spark, world, tmp_path):
    """A steward re-maps 'inpatient': the maintenance remap changes silver's concepts, the next publish
    rebuilds the extract with them, and silver's history names the map that did it."""
    import json

    from jobs.terminology.maps import load_terminology
    from jobs.terminology.remap import REMAP_PREFIX, remap_silver

    lake = Lake(str(tmp_path / "lake"))
    rows, _ = build_history()
    write_silver(spark, lake, rows)
    config = config_copy(tmp_path)
    consortium = load_consortium(config)
    publish(spark, lake, consortium, world["key"], FIRST)

    def visit_concepts() -> set:
        extract = read(spark, lake.project("diabetes_outcomes", "encounter"))
        return {(r.visit_source_value, r.visit_concept_id) for r in extract.select(
            "visit_source_value", "visit_concept_id").distinct().collect()}

    assert visit_concepts() == {("inpatient", 9201)}
    path = config / "terminology" / "visit-type.json"
    resource = json.loads(path.read_text(encoding="utf-8"))
    resource["version"] = "2"
    inpatient = next(e for e in resource["group"][1]["element"] if e["code"] == "inpatient")
    inpatient["target"] = [{"code": "262", "display": "Emergency Room and Inpatient Visit", "equivalence": "wider"}]
    path.write_text(json.dumps(resource), encoding="utf-8")

    assert remap_silver(spark, lake, load_terminology(config), ("encounter",))["encounter"] == len(rows["encounter"])
    publish(spark, lake, load_consortium(config), world["key"], FIRST)
    assert visit_concepts() == {("inpatient", 262)}
    history = spark.sql(f"DESCRIBE HISTORY delta.`{lake.silver('encounter')}`").collect()
    assert any((h.userMetadata or "").startswith(REMAP_PREFIX) and "visit-type|2" in h.userMetadata for h in history)
