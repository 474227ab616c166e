"""The synthetic consortium generator: reproducible, contract-conforming, honest about its defects.

The recount test re-reads every landed file without the generator's help
(strict decoding, field counts, the profile's date patterns, the reference
lists) and must find exactly the defects the ground truth lists.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from jobs import reference
from jobs.core.config import CsvProfile, FhirProfile, load_consortium
from jobs.generate import GenerationError, generate_consortium

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
SEED = 20260105


@pytest.fixture(scope="module")
def consortium():
    return load_consortium(CONFIG_DIR)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, consortium):
    out = tmp_path_factory.mktemp("consortium")
    summary = generate_consortium(out, consortium, patients=400, batches=3, seed=SEED, defect_rate=0.03)
    return out, summary


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _batches(out: Path, consortium):
    for est in consortium.establishments.values():
        for folder in sorted((out / "landing" / est.landing_folder).iterdir()):
            yield est, folder, json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------ determinism ----

def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path, consortium):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate_consortium(tmp_path / name, consortium, patients=120, batches=2, seed=seed, defect_rate=0.05)
    first, second, other = (_digests(tmp_path / n) for n in "abc")
    assert first == second
    assert set(first) == set(other)
    assert all(first[path] != other[path] for path in first if path.endswith((".csv", ".ndjson")))


def test_fhir_resources_built_in_chunks_give_the_same_bytes(tmp_path, consortium, monkeypatch):
    import jobs.generate.fhir_writer as fhir_writer

    generate_consortium(tmp_path / "whole", consortium, patients=120, batches=2, seed=7, defect_rate=0.05)
    monkeypatch.setattr(fhir_writer, "CHUNK_ROWS", 7)
    generate_consortium(tmp_path / "chunked", consortium, patients=120, batches=2, seed=7, defect_rate=0.05)
    assert _digests(tmp_path / "whole") == _digests(tmp_path / "chunked")


def test_bad_arguments_are_refused(tmp_path, consortium):
    with pytest.raises(GenerationError):
        generate_consortium(tmp_path, consortium, patients=10, batches=1, seed=1, defect_rate=1.5)
    with pytest.raises(GenerationError):
        generate_consortium(tmp_path, consortium, patients=0, batches=1, seed=1, defect_rate=0.0)


# ------------------------------------------------------- landing contract ----

def test_manifests_match_the_files(generated, consortium):
    out, summary = generated
    batch_ids = set()
    for est, folder, manifest in _batches(out, consortium):
        assert manifest["establishment"] == est.id
        assert manifest["batch_id"] == folder.name
        assert re.fullmatch(r"\d{8}-\d{3}", folder.name)
        assert manifest["kind"] == ("full" if folder.name.endswith("-001") else "incremental")
        assert dt.datetime.fromisoformat(manifest["extracted_at"]).tzinfo is not None
        listed = {f["path"] for f in manifest["files"]}
        assert listed == {p.name for p in folder.iterdir()} - {"manifest.json"}
        for entry in manifest["files"]:
            data = (folder / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            if entry["path"].endswith(".csv"):
                rows = data.count(b"\n") - 1
            elif entry["path"].endswith(".ndjson"):
                rows = sum(1 for line in data.split(b"\n") if line.strip())
            else:
                assert entry["dataset"] == "bundle"
                bundle = json.loads(data)
                assert bundle["type"] == "transaction"
                assert all(e["request"]["method"] == "DELETE" for e in bundle["entry"])
                rows = len(bundle["entry"])
            assert rows == entry["rows"], entry["path"]
            assert summary.rows[est.id][folder.name][entry["dataset"]] == rows
        batch_ids.add(folder.name)
    assert sorted(batch_ids) == summary.batch_ids


def test_csv_dialects_follow_the_profiles(generated, consortium):
    out, _ = generated
    chu = consortium.establishment("chu_laurentides")
    riviere = consortium.establishment("hopital_riviere")
    french = (out / "landing" / chu.landing_folder / "20260105-001" / "patient.csv").read_bytes()
    assert not french.startswith(b"\xef\xbb\xbf")
    header = french.split(b"\n", 1)[0].decode("latin-1")
    assert header.split(";") == list(chu.input.columns["patient"])
    assert "nom" in header and "date_naissance" in header
    assert re.search(rb"[\xc0-\xff]", french), "accented letters are single latin-1 bytes"
    with pytest.raises(UnicodeDecodeError):
        french.decode("utf-8")
    assert re.search(rb";\d{2}/\d{2}/\d{4};", french)
    labs = (out / "landing" / chu.landing_folder / "20260105-001" / "lab_result.csv").read_bytes()
    assert re.search(rb";\d+,\d+;", labs), "decimal comma"

    english = (out / "landing" / riviere.landing_folder / "20260105-001" / "patient.csv").read_bytes()
    assert english.startswith(b"\xef\xbb\xbf")
    header = english[3:].split(b"\n", 1)[0].decode("utf-8")
    assert header.split(",") == list(riviere.input.columns["patient"])
    assert re.search(rb",\d{4}-\d{2}-\d{2},", english)


def test_fhir_files_hold_one_resource_type_each(generated, consortium):
    out, _ = generated
    est = consortium.establishment("cisss_estuaire")
    folder = out / "landing" / est.landing_folder / "20260105-001"
    for path in folder.glob("*.ndjson"):
        types = Counter()
        for line in path.read_bytes().splitlines():
            try:
                types[json.loads(line.decode("utf-8"))["resourceType"]] += 1
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
        assert set(types) == {path.stem}
    patient = json.loads((folder / "Patient.ndjson").read_bytes().splitlines()[0])
    systems = {i.get("system") for i in patient["identifier"]}
    assert systems & set(est.input.nam_systems)
    assert any(i.get("type", {}).get("coding", [{}])[0].get("code") == "MR" for i in patient["identifier"])


# --------------------------------------------------------------- persons ----

NAM = re.compile(r"^([A-Z]{3}[A-Z])(\d{2})(\d{2})(\d{2})(\d{2})$")


def _nam_ok(nam: str | None) -> bool:
    match = NAM.match(nam or "")
    if not match:
        return False
    month, day = int(match.group(3)), int(match.group(4))
    month -= 50 if month > 50 else 0
    days = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
    return 1 <= month <= 12 and 1 <= day <= days[month - 1]


def test_persons_are_linked_across_establishments(generated):
    out, _ = generated
    persons = _jsonl(out / "ground_truth" / "persons.jsonl")
    assert len(persons) == 400
    multi = [p for p in persons if len({e["establishment"] for e in p["establishments"]}) >= 2]
    assert len(multi) >= 0.2 * len(persons)
    assert len({p["nam"] for p in persons}) == len(persons)
    for person in persons:
        assert person["nam_valid"] and _nam_ok(person["nam"])
        birth = dt.date.fromisoformat(person["birth_date"])
        female = int(person["nam"][6:8]) > 50
        assert female == (person["sex"] == "female")
        assert person["nam"][4:6] == f"{birth.year % 100:02d}" and int(person["nam"][8:10]) == birth.day
        assert re.fullmatch(r"[A-Z]\d[A-Z] \d[A-Z]\d", person["postal_code"])
        mrns = [e["mrn"] for e in person["establishments"]]
        assert len(set(mrns)) == len(mrns)
    spelled_differently = [p for p in multi if len({(e["family_name"], e["given_name"])
                                                    for e in p["establishments"]}) > 1]
    assert spelled_differently
    assert any(re.search("[éèêëàâçîïôûù]", p["family_name"] + p["given_name"]) for p in persons)


def test_consent_history_has_grants_refusals_and_later_withdrawals(generated):
    out, _ = generated
    decisions = _jsonl(out / "ground_truth" / "consents.jsonl")
    kinds = Counter(d["decision"] for d in decisions)
    assert kinds["permit"] and kinds["deny"] and kinds["withdraw"]
    assert all(d["batch_id"] != "20260105-001" for d in decisions if d["decision"] == "withdraw")
    by_person = defaultdict(set)
    for d in decisions:
        by_person[d["nam"]].add(d["establishment"])
    assert any(len(e) > 1 for e in by_person.values())
    # A consent that carried a defect is never touched again.
    history = defaultdict(list)
    for d in decisions:
        history[(d["establishment"], d["consent_ref"])].append(d)
    for rows in history.values():
        flawed = [i for i, row in enumerate(rows) if row["defect"]]
        assert not flawed or flawed == [len(rows) - 1]


def test_incremental_batches_carry_updates_and_deletions_but_never_delete_patients(generated, consortium):
    out, _ = generated
    chu = consortium.establishment("chu_laurentides").input
    deletes = {code for code, action in chu.action_values.items() if action == "delete"}
    seen_refs: dict[str, set[str]] = defaultdict(set)
    updated = deleted = 0
    for folder in sorted((out / "landing" / "chu_laurentides").iterdir()):
        for path in sorted(folder.glob("*.csv")):
            lines = path.read_bytes().decode("latin-1").splitlines()[1:]
            for line in lines:
                fields = line.split(";")
                if fields[0] in seen_refs[path.name] and fields[-1] not in deletes:
                    updated += 1
                if fields[-1] in deletes:
                    assert path.name != "patient.csv"
                    deleted += 1
                seen_refs[path.name].add(fields[0])
    assert updated and deleted


# ---------------------------------------------------------------- recount ----

EVENT_DATE = {"patient": "birth_date", "encounter": "visit_start", "diagnosis": "condition_date",
              "lab_result": "measured_at", "medication": "start_date", "consent": "decision_date"}
DATETIMES = {"visit_start", "visit_end", "measured_at"}
OTHER_DATES = {"deceased_date", "visit_end", "end_date", "valid_from", "valid_until"}
MAIN_CODE = {"diagnosis": "condition_code", "lab_result": "loinc_code", "medication": "drug_code"}
REF = {"patient": "patient_ref", "encounter": "encounter_ref", "diagnosis": "diagnosis_ref",
       "lab_result": "lab_result_ref", "medication": "medication_ref", "consent": "consent_ref"}


def _strftime(spark: str) -> str:
    return (spark.replace("yyyy", "%Y").replace("MM", "%m").replace("dd", "%d").replace("HH", "%H")
            .replace("mm", "%M").replace("ss", "%S").replace("'T'", "T"))


def _csv_findings(raw: bytes, previous: bytes | None, profile: CsvProfile, dataset: str,
                  extracted: dt.datetime) -> list[str]:
    if raw == previous:
        return ["duplicate_row"]
    if profile.encoding == "latin-1":
        if re.search(rb"[\x80-\x9f]", raw):
            return ["bad_encoding"]
        text = raw.decode("latin-1")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return ["bad_encoding"]
    headers = list(profile.columns[dataset])
    if text.count(profile.quote) % 2:
        return ["malformed_line"]
    try:
        fields = next(csv.reader([text], delimiter=profile.delimiter, quotechar=profile.quote, strict=True))
    except csv.Error:
        return ["malformed_line"]
    if len(fields) != len(headers):
        return ["malformed_line"]
    record = {profile.columns[dataset][h]: v for h, v in zip(headers, fields)}
    assert record["record_action"] in profile.action_values
    if profile.action_values[record["record_action"]] == "delete":
        assert record[REF[dataset]]
        return []
    found = []
    required = [REF[dataset]] + ([] if dataset == "patient" else ["patient_ref"]) + (
        [MAIN_CODE[dataset]] if dataset in MAIN_CODE else [])
    if any(not record[c] for c in required):
        found.append("missing_required")
    limit = extracted.replace(tzinfo=None)
    for column in (EVENT_DATE[dataset], *sorted(OTHER_DATES & set(record))):
        if not record.get(column):
            continue
        pattern = _strftime(profile.datetime_format if column in DATETIMES else profile.date_format)
        try:
            when = dt.datetime.strptime(record[column], pattern)
        except ValueError:
            assert column == EVENT_DATE[dataset], f"unreadable {column}: {record[column]!r}"
            found.append("impossible_date")
            continue
        if column == EVENT_DATE[dataset] and when > limit:
            found.append("future_date")
        elif column in ("deceased_date", "visit_end", "valid_from"):
            assert when <= limit or "future_date" in found, f"{column} in the future"
    found += _code_findings(dataset, record)
    if dataset == "lab_result" and record["loinc_code"] in reference.loinc():
        value = float(record["value"].replace(profile.decimal_separator, "."))
        if not reference.loinc()[record["loinc_code"]].is_plausible(value):
            found.append("out_of_range")
    if dataset == "patient" and not _nam_ok(record["nam"]):
        found.append("invalid_nam")
    return found


def _code_findings(dataset: str, record: dict) -> list[str]:
    if dataset == "diagnosis" and record["condition_code"]:
        return [] if record["condition_code"] in reference.codes(record["condition_system"]) else ["unknown_code"]
    if dataset == "lab_result" and record["loinc_code"]:
        return [] if record["loinc_code"] in reference.loinc() else ["unknown_code"]
    if dataset == "medication" and record["drug_code"]:
        return [] if record["drug_code"] in reference.codes(record["drug_system"]) else ["unknown_code"]
    return []


FHIR_EVENT = {"Patient": ("birthDate",), "Encounter": ("period", "start"), "Condition": ("recordedDate",),
              "Observation": ("effectiveDateTime",), "MedicationRequest": ("authoredOn",), "Consent": ("dateTime",)}
FHIR_CODE = {"Condition": ("code",), "Observation": ("code",), "MedicationRequest": ("medicationCodeableConcept",)}


def _fhir_findings(raw: bytes, previous: bytes | None, profile: FhirProfile,
                   extracted: dt.datetime) -> tuple[list[str], str | None]:
    if raw == previous:
        resource = json.loads(raw)
        return ["duplicate_row"], resource.get("id")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ["bad_encoding"], re.search(rb'"id":"[^0-9a-f]*([0-9a-f-]{36})', raw).group(1).decode()
    try:
        resource = json.loads(text)
    except json.JSONDecodeError:
        match = re.search(r'"id":"([^"]+)"', text)
        return ["malformed_line"], match.group(1) if match else None
    kind = resource["resourceType"]
    found = []
    subject = resource.get("patient" if kind == "Consent" else "subject", {}).get("reference")
    missing = not resource.get("id") or (kind != "Patient" and not subject) or (
        kind in FHIR_CODE and not resource.get(FHIR_CODE[kind][0]))
    if missing:
        found.append("missing_required")
    value = resource
    for key in FHIR_EVENT[kind]:
        value = value.get(key, {}) if isinstance(value, dict) else None
    try:
        when = dt.datetime.fromisoformat(value) if "T" in value else dt.datetime.fromisoformat(value + "T00:00:00")
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone(dt.timedelta(hours=-5)))
        if when > extracted:
            found.append("future_date")
    except ValueError:
        found.append("impossible_date")
    if kind in FHIR_CODE and resource.get(FHIR_CODE[kind][0]):
        coding = resource[FHIR_CODE[kind][0]]["coding"][0]
        system = reference.SYSTEMS_BY_FHIR_URI[coding["system"]]
        if coding["code"] not in reference.codes(system):
            found.append("unknown_code")
        elif kind == "Observation":
            if not reference.loinc()[coding["code"]].is_plausible(resource["valueQuantity"]["value"]):
                found.append("out_of_range")
    if kind == "Patient":
        nams = [i.get("value") for i in resource["identifier"] if i.get("system") in profile.nam_systems]
        if not _nam_ok(nams[0] if nams else None):
            found.append("invalid_nam")
    return found, resource.get("id")


def test_recount_of_defects_matches_the_ground_truth(generated, consortium):
    out, summary = generated
    truth = _jsonl(out / "ground_truth" / "defects.jsonl")
    recount = []
    for est, folder, manifest in _batches(out, consortium):
        extracted = dt.datetime.fromisoformat(manifest["extracted_at"].replace("Z", "+00:00"))
        for entry in manifest["files"]:
            if entry["dataset"] == "bundle":
                continue
            data = (folder / entry["path"]).read_bytes()
            if isinstance(est.input, CsvProfile):
                if est.input.encoding == "utf-8-sig":
                    assert data.startswith(b"\xef\xbb\xbf")
                    data = data[3:]
                lines = data.split(b"\n")[:-1]
                first, offset = 1, 2
            else:
                lines = data.split(b"\n")[:-1]
                first, offset = 0, 1
            previous = None
            for number, raw in enumerate(lines[first:], start=offset):
                if isinstance(est.input, CsvProfile):
                    found = _csv_findings(raw, previous, est.input, entry["dataset"], extracted)
                    resource_id = None
                else:
                    found, resource_id = _fhir_findings(raw, previous, est.input, extracted)
                assert len(found) <= 1, (est.id, folder.name, entry["path"], number, found)
                if found:
                    recount.append({"establishment": est.id, "batch_id": folder.name, "dataset": entry["dataset"],
                                    "file": entry["path"], "line": number, "resource_id": resource_id,
                                    "kind": found[0]})
                previous = raw

    def key(d):
        return (d["establishment"], d["batch_id"], d["file"], d["line"])

    expected = {key(d): (d["kind"], d["dataset"], d["resource_id"]) for d in truth}
    observed = {key(d): (d["kind"], d["dataset"], d["resource_id"]) for d in recount}
    assert observed == expected
    assert len(truth) == summary.defects
    kinds = Counter(d["kind"] for d in truth)
    assert set(kinds) == {"invalid_nam", "impossible_date", "future_date", "unknown_code", "missing_required",
                          "duplicate_row", "malformed_line", "bad_encoding", "out_of_range"}
    rules = {d["kind"]: (d["expected"], d["rule"]) for d in truth}
    assert rules["invalid_nam"] == ("flagged", "pseudonymise.invalid_nam")
    assert rules["duplicate_row"] == ("duplicate", "dedup.exact_duplicate")
    assert rules["bad_encoding"] == ("quarantine", "ingest.encoding")


def test_reference_lists_load_and_bound_values():
    assert len(reference.icd10ca()) >= 40
    assert len(reference.loinc()) >= 15
    assert {"diabetes", "hypertension", "oncology", "respiratory", "cardiac"} <= {
        d.condition_group for d in reference.icd10ca().values()}
    potassium = reference.loinc()["2823-3"]
    assert potassium.unit == "mmol/L" and potassium.is_plausible(4.1) and not potassium.is_plausible(45)
    assert reference.codes("ATC") and reference.codes("DIN")
    assert not reference.codes("ATC") & reference.codes("DIN")


def test_birth_dates_do_not_pile_up_at_the_age_bounds():
    import numpy as np

    from jobs.generate.people import make_population

    population = make_population(np.random.default_rng(3), 50_000, np.datetime64("2026-01-05"))
    # ~37,000 possible days for 50,000 persons: no day may hold hundreds (as clipped ages once did).
    assert population["birth_date"].value_counts().max() < 30
    assert population["nam"].is_unique


def test_homonyms_beyond_the_administrative_digits_stop_generation():
    import numpy as np

    from jobs.generate.people import TAILS, _nams

    count = TAILS + 1
    same = lambda value: np.array([value] * count, dtype=object)  # noqa: E731
    with pytest.raises(GenerationError, match="administrative digits"):
        _nams(np.random.default_rng(0), same("Tremblay"), same("Marie"),
              np.array(["1980-03-02"] * count, dtype="datetime64[D]"), same("female"))
    assert len(set(_nams(np.random.default_rng(0), same("Tremblay")[:TAILS], same("Marie")[:TAILS],
                         np.array(["1980-03-02"] * TAILS, dtype="datetime64[D]"), same("female")[:TAILS]))) == TAILS
