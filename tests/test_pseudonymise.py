import datetime as dt
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs.stages.ingest import ingest_batch
from jobs.privacy.keys import KeyMismatchError, MissingKeyError, WeakKeyError, load_key
from jobs.core.lake import Lake
from jobs.stages.pseudonymise import is_valid_nam, normalise_nam, pseudonymise_batch
from tests.conftest import OTHER_TEST_KEY, TEST_KEY, copy_lake
from tests.landing_helpers import (LAURENTIDES_ENCOUNTER_HEADER, LAURENTIDES_PATIENT_HEADER, RIVIERE_PATIENT_HEADER,
                                   latin1_csv, utf8_bom_csv, write_batch)

LAURENTIDES = [
    "L001;TREM85521201;Tremblay;Éloïse;12/02/1985;F;12 rue des Érables;Montréal;H2X 1Y4;514-555-0101;e@x.ca;;A",
    "L002;XXXX;Gagnon;Luc;01/01/1990;M;3 av. du Parc;Laval;H7N 2B3;450-555-0102;l@x.ca;;A",
    "L002;XXXX;Gagnon;Luc;01/01/1990;M;3 av. du Parc;Laval;H7N 2B3;450-555-0102;l@x.ca;;A",
]
ENCOUNTERS = [
    "S1;L001;03/01/2026 08:00;04/01/2026 12:30;hospitalisation;Médecine interne;Douleur thoracique;A",
    "S2;L999;03/01/2026 08:00;;urgence;Urgence;;A",
]
# The same person at another establishment: other MRN, name without accents, same NAM.
RIVIERE = ["R-77,trem 8552 1201,TREMBLAY,Eloise,1985-02-12,F,12 rue des Erables,Montreal,H2X1Y4,5145550101,e@x.ca,,I"]


BATCHES = [("chu_laurentides", "20260105-001"), ("hopital_riviere", "20260105-001")]


def _pseudonymise(spark, consortium, lake, key):
    for est, batch in BATCHES:
        pseudonymise_batch(spark, lake, consortium, key, est, batch)


@pytest.fixture(scope="module")
def ingested(spark, consortium, tmp_path_factory):
    """Both batches ingested into bronze (no key involved yet); tests pseudonymise copies of it."""
    root = tmp_path_factory.mktemp("pseudonymise")
    landing = root / "landing"
    write_batch(landing, "chu_laurentides", "20260105-001", {
        "patients.csv": ("patient", latin1_csv(LAURENTIDES_PATIENT_HEADER, LAURENTIDES)),
        "sejours.csv": ("encounter", latin1_csv(LAURENTIDES_ENCOUNTER_HEADER, ENCOUNTERS)),
    })
    write_batch(landing, "hopital_riviere", "20260105-001", {
        "patients.csv": ("patient", utf8_bom_csv(RIVIERE_PATIENT_HEADER, RIVIERE)),
    })
    lake = Lake(str(root / "lake"))
    for est, batch in BATCHES:
        ingest_batch(spark, lake, landing, consortium, est, batch)
    return root / "lake"


@pytest.fixture(scope="module")
def keyed(spark, consortium, ingested, tmp_path_factory):
    """The ingested batches pseudonymised with the test key; read only."""
    lake = Lake(str(copy_lake(ingested, tmp_path_factory.mktemp("keyed") / "lake")))
    _pseudonymise(spark, consortium, lake, load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False))
    return lake


def _patients(spark, lake):
    return {r.establishment_id + "/" + str(r._source_line): r
            for r in spark.read.format("delta").load(lake.staged("patient")).collect()}


def test_one_person_across_establishments_and_fallback_flagged(spark, keyed):
    lake = keyed
    patients = _patients(spark, lake)
    tremblay_l, gagnon, tremblay_r = patients["chu_laurentides/2"], patients["chu_laurentides/3"], patients["hopital_riviere/2"]
    assert (tremblay_l.person_id_source, tremblay_r.person_id_source) == ("nam", "nam")
    assert tremblay_l.person_id == tremblay_r.person_id and tremblay_l.person_id_source == "nam"
    assert tremblay_l.patient_key != tremblay_r.patient_key
    assert gagnon.person_id_source == "establishment_fallback" and gagnon.person_id_flag == "establishment_fallback"
    assert (tremblay_l.year_of_birth, tremblay_l.month_of_birth) == (1985, 2)
    assert len(patients) == 3  # the exact duplicate of L002 is dropped and counted
    log = spark.read.format("delta").load(lake.ops("batch_log")).where("stage = 'pseudonymise' AND dataset = 'patient'")
    assert sorted((r.establishment_id, r.rows_duplicates) for r in log.collect()) == [
        ("chu_laurentides", 1), ("hopital_riviere", 0)]
    encounters = {r._source_line: r for r in spark.read.format("delta").load(lake.staged("encounter")).collect()}
    assert encounters[2].person_id == tremblay_l.person_id and encounters[2].visit_start_date.isoformat() == "2026-01-03"
    assert encounters[3].person_id is None and encounters[3].person_id_flag == "unknown_patient"
    assert "date:visit_start_date" not in encounters[2]._parse_errors


def test_same_key_same_pseudonyms_other_key_other_pseudonyms(spark, consortium, ingested, keyed, tmp_path,
                                                             pseudonym_key):
    ids = [sorted(r.person_id for r in _patients(spark, keyed).values())]
    for name, key in [("same", pseudonym_key),
                      ("other", load_key({"AFFLUENT_PSEUDONYM_KEY": OTHER_TEST_KEY}, use_airflow=False))]:
        lake = Lake(str(copy_lake(ingested, tmp_path / name)))
        _pseudonymise(spark, consortium, lake, key)
        ids.append(sorted(r.person_id for r in _patients(spark, lake).values()))
    assert ids[0] == ids[1]
    assert not set(ids[0]) & set(ids[2])


def test_a_table_keyed_with_another_key_refuses_the_write(spark, consortium, keyed, tmp_path):
    lake = Lake(str(copy_lake(Path(keyed.root), tmp_path / "lake")))
    other = load_key({"AFFLUENT_PSEUDONYM_KEY": OTHER_TEST_KEY}, use_airflow=False)
    spark.sql(f"DELETE FROM delta.`{lake.ops('batch_log')}` WHERE stage = 'pseudonymise'")
    with pytest.raises(KeyMismatchError, match="fingerprint"):
        pseudonymise_batch(spark, lake, consortium, other, "chu_laurentides", "20260105-001")


@pytest.mark.parametrize("env, error, hint", [
    ({}, MissingKeyError, "Set AFFLUENT_PSEUDONYM_KEY"),
    ({"AFFLUENT_PSEUDONYM_KEY": "short-secret"}, WeakKeyError, "at least 32 are required"),
    ({"AFFLUENT_PSEUDONYM_KEY": "correct horse battery staple is my secret key!!"}, WeakKeyError, "affluent key generate"),
    ({"AFFLUENT_PSEUDONYM_KEY_FILE": "/nonexistent/key"}, MissingKeyError, "does not exist"),
])
def test_missing_or_short_key_stops_with_what_to_set(env, error, hint):
    with pytest.raises(error, match=hint):
        load_key(env, use_airflow=False)


def test_key_never_shows_in_its_repr():
    key = load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)
    assert TEST_KEY not in repr(key) and "fingerprint" in repr(key)


def test_nam_validation(spark):
    rows = [("TREM 8552 1512", "1985-02-15", "female", True),   # female: month + 50
            ("TREM85021512", "1985-02-12", "female", False),    # month not +50 for a woman
            ("GAGL90010112", "1990-01-01", "male", True),
            ("GAGL90013212", None, None, False),                # day 32
            ("GAG90010112", None, None, False),                 # 3 letters
            (None, None, None, False), ("", None, None, False)]
    df = spark.createDataFrame(rows, "nam string, birth string, sex string, expected boolean")
    nam = normalise_nam(F.col("nam"))
    got = df.select(is_valid_nam(nam, F.to_date("birth"), F.col("sex")).alias("ok"), "expected").collect()
    assert [r.ok for r in got] == [r.expected for r in got]


def test_linkage_takes_the_first_valid_identifier_of_the_declared_systems(spark, consortium, pseudonym_key):
    """Priority order, normalisation and check digits decide the person_id; the same identifier gives the
    same person_id in any establishment, whatever its spelling."""
    from jobs.core.config import PersonIdentifierSystem
    from jobs.stages.pseudonymise import Keyring, Parser, pseudonymise_patients
    from jobs.core.schemas import bronze_schema

    systems = [PersonIdentifierSystem(id="nam", check="nam"),
               PersonIdentifierSystem(id="enterprise_mpi", normalise="digits", pattern="^[0-9]{10}$", check="luhn")]
    mpi = '{"enterprise_mpi": "%s"}'
    patients = [  # patient_ref, nam, birth date, sex, other identifiers
        ("a", "TREM 8552 1512", "1985-02-15", "female", mpi % "100-007-9192"),  # valid NAM wins
        ("b", None, "1985-02-15", "female", mpi % "1000079192"),                # MPI, other spelling
        ("c", None, "1985-02-15", "female", mpi % "100-007-9193"),              # Luhn check digit wrong
        ("d", "TREM85021512", "1985-02-15", "female", mpi % "100-007-9192"),    # NAM invalid: MPI next
        ("e", None, None, None, None),                                          # nothing: fallback
    ]
    names = bronze_schema("patient").fieldNames()
    rows = [{**{n: None for n in names}, "patient_ref": ref, "nam": nam, "birth_date": birth, "sex": sex,
             "person_identifiers": others, "record_action": "upsert", "_establishment": "x", "_batch_id": "b",
             "_source_file": "f", "_source_line": 1, "_extracted_at": dt.datetime(2026, 1, 5),
             "_ingested_at": dt.datetime(2026, 1, 5)}
            for ref, nam, birth, sex, others in patients]
    bronze = spark.createDataFrame(rows, bronze_schema("patient"))
    est = consortium.establishments["cisss_estuaire"]
    keys = Keyring.for_establishment(spark, pseudonym_key, "x")
    got = {r.patient_key: r for r in pseudonymise_patients(bronze, keys, Parser(est), systems).collect()}
    by_ref = {ref: got[k] for ref, k in zip("abcde", [r[0] for r in spark.createDataFrame(
        [(ref,) for ref in "abcde"], "r string").select(keys.record_id("patient", F.col("r"))).collect()])}
    assert [by_ref[r].person_id_source for r in "abcde"] == [
        "nam", "enterprise_mpi", "establishment_fallback", "enterprise_mpi", "establishment_fallback"]
    assert by_ref["b"].person_id == by_ref["d"].person_id != by_ref["a"].person_id
    assert by_ref["c"].person_id_flag == "establishment_fallback"
