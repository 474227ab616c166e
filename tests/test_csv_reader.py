import datetime as dt

import pytest

from jobs.readers.csv import HeaderError, FileLineage, read_csv_file, read_header

LINEAGE = FileLineage("chu_laurentides", "b1", "chu_laurentides/b1/patient.csv",
                      dt.datetime(2026, 1, 5, 2), dt.datetime(2026, 1, 5, 3))

HEADER = "no_dossier;nam;nom;prenom;date_naissance;sexe;adresse;ville;code_postal;telephone;courriel;date_deces;action"


def _write(tmp_path, lines: list[bytes]):
    path = tmp_path / "patient.csv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return path


def test_every_line_lands_or_is_quarantined_with_its_line_and_rule(spark, consortium, tmp_path):
    profile = consortium.establishments["chu_laurentides"].input
    good = "M001;TREM85521512;Tremblay;Éloïse;12/02/1985;F;12 rue des Érables;Montréal;H2X 1Y4;514-555-0101;e@x.ca;;A"
    lines = [
        HEADER.encode("latin-1"),
        good.encode("latin-1"),
        b"M002;GAGN;Gagnon",                                   # too few fields
        good.replace("M001", "M003").encode("latin-1") + b";extra",  # too many fields
        b"M004;x;y",                                            # too few fields
        good.replace("M001", "M005").encode("latin-1").replace(b"Montr", b"Mon\x85tr"),  # C1 control byte
        b"",                                                    # blank line: not a record
        good.replace("M001", "M006").replace(";A", ";Z").encode("latin-1"),  # unknown action
        '"M007";"TREM85521512";"Tremblay; fils";Luc;01/01/1990;M;;;;;;;M'.encode("latin-1"),  # quoted delimiter
        b'M010;"TREM"x;a;b;1;2;3;4;5;6;7;8;A',                  # characters after a closing quote
        b'M008;"unbalanced;x;y;z;1;2;3;4;5;6;7;A',            # a quote never closed runs to the end
        b"M009;after;the;open;quote",
    ]
    result = read_csv_file(spark, _write(tmp_path, lines), "patient", profile, LINEAGE)
    bronze = {r.patient_ref: r for r in result.bronze["patient"].collect()}
    quarantine = {r.source_line: r for r in result.quarantine.collect()}

    assert set(bronze) == {"M001", "M007"}
    assert bronze["M001"].given_name == "Éloïse" and bronze["M001"].sex == "female"
    assert bronze["M001"].record_action == "upsert" and bronze["M001"]._source_line == 2
    assert bronze["M007"].family_name == "Tremblay; fils"
    assert {k: v.rule for k, v in quarantine.items()} == {
        3: "ingest.malformed_line", 4: "ingest.malformed_line", 5: "ingest.malformed_line",
        6: "ingest.encoding", 8: "ingest.unknown_action", 10: "ingest.malformed_line", 11: "ingest.malformed_line",
    }
    assert "characters after a closing \" quote" in quarantine[10].reason
    assert "unbalanced \" quote (record of lines 11-12): the quote is never closed" in quarantine[11].reason
    assert "patient.csv line 3: 3 fields, the header has 13" in quarantine[3].reason
    for row in quarantine.values():  # nothing identifying in quarantine
        assert "TREM" not in (row.record_safe or "") + row.reason and "Gagnon" not in row.reason


def test_header_without_action_column_is_refused(spark, consortium, tmp_path):
    profile = consortium.establishments["chu_laurentides"].input
    path = _write(tmp_path, [b"no_dossier;nam", b"M1;X"])
    with pytest.raises(HeaderError, match="line 1: no action column"):
        read_csv_file(spark, path, "patient", profile, LINEAGE)


ENCOUNTER_HEADER = "no_sejour;no_dossier;date_debut;date_fin;type_sejour;unite;note_admission;action"
ENCOUNTER_LINEAGE = FileLineage("chu_laurentides", "b1", "chu_laurentides/b1/sejours.csv",
                                dt.datetime(2026, 1, 5, 2), dt.datetime(2026, 1, 5, 3))


def _encounters(tmp_path, rows: list[bytes], name="sejours.csv"):
    path = tmp_path / name
    path.write_bytes(b"\r\n".join([ENCOUNTER_HEADER.encode("latin-1"), *rows]) + b"\r\n")
    return path


def _spark_still_answers(spark):
    assert spark.range(3).selectExpr("sum(id) AS s").first().s == 3


# A note of 1 MB spread over about 22,000 physical lines and holding about 45,000 quote characters
# (doubled quotes): every check on a record must stay linear in its length and in its quotes.
LONG_NOTE_BYTES = 1_000_000


def test_a_long_quoted_note_with_line_breaks_and_delimiters_lands(spark, consortium, tmp_path):
    profile = consortium.establishments["chu_laurentides"].input
    paragraph = 'Patient admis; douleur "thoracique" irradiant au bras gauche.\nAntécédents: HTA; diabète.\n'
    note = (paragraph * (LONG_NOTE_BYTES // len(paragraph) + 1))[:LONG_NOTE_BYTES].rstrip() + "."
    quoted = '"' + note.replace('"', '""') + '"'
    rows = [
        f"S1;L001;03/01/2026 08:00;04/01/2026 12:30;hospitalisation;Médecine;{quoted};A".encode("latin-1"),
        "S2;L002;05/01/2026 08:00;;urgence;Urgence;;A".encode("latin-1"),
    ]
    result = read_csv_file(spark, _encounters(tmp_path, rows), "encounter", profile, ENCOUNTER_LINEAGE)
    bronze = {r.encounter_ref: r for r in result.bronze["encounter"].collect()}
    assert result.quarantine.count() == 0
    assert bronze["S1"].admission_note == note and bronze["S1"].care_site == "Médecine"
    assert bronze["S1"]._source_line == 2
    # The note spans many physical lines; the next record keeps its own line number.
    assert bronze["S2"]._source_line == 2 + note.count("\n") + 1
    _spark_still_answers(spark)


def test_characters_before_an_opening_quote_make_a_malformed_line(spark, consortium, tmp_path):
    profile = consortium.establishments["chu_laurentides"].input
    rows = [
        b'S1;L001;03/01/2026 08:00;;urgence;Urgence;avant"note";A',
        b'S2;L002;05/01/2026 08:00;;urgence;Urgence; "note" ;A',
        b'S3;L003;05/01/2026 08:00;;urgence;Urgence;note;"A"',
    ]
    result = read_csv_file(spark, _encounters(tmp_path, rows), "encounter", profile, ENCOUNTER_LINEAGE)
    assert sorted(r.encounter_ref for r in result.bronze["encounter"].collect()) == ["S2", "S3"]
    quarantine = result.quarantine.collect()
    assert [(r.rule, r.source_line) for r in quarantine] == [("ingest.malformed_line", 2)]
    assert "before an opening one" in quarantine[0].reason


def test_a_field_over_max_field_bytes_is_quarantined_with_its_file_and_line(spark, consortium, tmp_path):
    profile = consortium.establishments["chu_laurentides"].input
    huge = b"x" * (50 * 1024 * 1024)  # 50 MB unquoted value, generated here and never committed
    rows = [
        b"S1;L001;03/01/2026 08:00;;urgence;Urgence;" + huge + b";A",
        b"S2;L002;05/01/2026 08:00;;urgence;Urgence;court;A",
    ]
    result = read_csv_file(spark, _encounters(tmp_path, rows), "encounter", profile, ENCOUNTER_LINEAGE)
    quarantine = result.quarantine.collect()
    assert [r.encounter_ref for r in result.bronze["encounter"].collect()] == ["S2"]
    assert [(r.rule, r.source_file, r.source_line) for r in quarantine] == [
        ("ingest.field_too_long", "chu_laurentides/b1/sejours.csv", 2)]
    assert "field note_admission holds 52428800 bytes, more than max_field_bytes 1048576" in quarantine[0].reason
    _spark_still_answers(spark)


def test_a_profile_may_lower_the_consortium_field_limit(spark, consortium, tmp_path):
    profile = consortium.establishments["chu_laurentides"].input.model_copy(update={"max_field_bytes": 100})
    rows = [b"S1;L001;03/01/2026 08:00;;urgence;Urgence;" + b"y" * 101 + b";A",
            b"S2;L002;05/01/2026 08:00;;urgence;Urgence;" + b"y" * 100 + b";A"]
    result = read_csv_file(spark, _encounters(tmp_path, rows), "encounter", profile, ENCOUNTER_LINEAGE)
    assert [r.encounter_ref for r in result.bronze["encounter"].collect()] == ["S2"]
    assert [r.rule for r in result.quarantine.collect()] == ["ingest.field_too_long"]


def test_utf8_text_in_a_latin1_profile_is_quarantined_as_an_encoding_mismatch(spark, consortium, tmp_path):
    profile = consortium.establishments["chu_laurentides"].input
    rows = [
        "S1;L001;03/01/2026 08:00;;urgence;Unité de soins;;A".encode("utf-8"),
        "S2;L002;05/01/2026 08:00;;urgence;Unité de soins;«ÉTÉ» °C;A".encode("latin-1"),
    ]
    result = read_csv_file(spark, _encounters(tmp_path, rows), "encounter", profile, ENCOUNTER_LINEAGE)
    bronze = result.bronze["encounter"].collect()
    quarantine = result.quarantine.collect()
    assert [(r.encounter_ref, r.care_site, r.admission_note) for r in bronze] == [("S2", "Unité de soins", "«ÉTÉ» °C")]
    assert [(r.rule, r.source_line) for r in quarantine] == [("ingest.encoding_mismatch", 2)]
    assert "bytes are UTF-8 but the profile declares latin-1" in quarantine[0].reason


def test_a_byte_order_mark_never_renames_the_first_header(spark, consortium, tmp_path):
    from tests.landing_helpers import RIVIERE_PATIENT_HEADER, utf8_bom_csv

    profile = consortium.establishments["hopital_riviere"].input.model_copy(update={"encoding": "utf-8"})
    path = tmp_path / "patients.csv"
    path.write_bytes(utf8_bom_csv(RIVIERE_PATIENT_HEADER, [
        "R001,RIVA85521512,Rivard,Anne,1985-02-12,F,1 Main St,Rimouski,G5L 1A1,418-555-0101,a@x.ca,,I"]))
    lineage = FileLineage("hopital_riviere", "b1", "hopital_riviere/b1/patients.csv",
                          dt.datetime(2026, 1, 5, 2), dt.datetime(2026, 1, 5, 3))
    assert read_header(path, profile, "b#0")[0] == "mrn"
    result = read_csv_file(spark, path, "patient", profile, lineage)
    assert [r.patient_ref for r in result.bronze["patient"].collect()] == ["R001"]
    assert result.quarantine.count() == 0
    assert len(result.notes) == 1 and "byte-order mark (EF BB BF) removed" in result.notes[0]

    latin1 = consortium.establishments["chu_laurentides"].input
    bom_latin1 = tmp_path / "bom.csv"
    bom_latin1.write_bytes(b"\xef\xbb\xbf" + HEADER.encode("utf-8") + b"\r\n")
    with pytest.raises(HeaderError, match="UTF-8 byte-order mark .* the profile declares latin-1"):
        read_csv_file(spark, bom_latin1, "patient", latin1, LINEAGE)



def _snapshot_profile():
    from jobs.core.config import CsvProfile

    return CsvProfile(
        format="csv", delimiter=",", encoding="utf-8", date_format="MM/dd/yyyy", datetime_format="MM/dd/yyyy HH:mm",
        default_action="upsert",
        columns={"patient": {"Id": "patient_ref", "BIRTHDATE": "birth_date"},
                 "diagnosis": {"PATIENT": "patient_ref", "CODE": "condition_code", "START": "condition_date"}},
        derived_ids={"diagnosis": ["PATIENT", "CODE", "START"]},
        constants={"diagnosis": {"condition_system": "SNOMED"}},
        ignored_columns={"diagnosis": ["DESCRIPTION"], "patient": ["SSN"]},
        person_identifiers={"enterprise_mpi": "MPI"})


def test_a_snapshot_file_gets_the_default_action_derived_ids_and_constants(spark, tmp_path):
    from jobs.readers.csv import DERIVED_ID_SEPARATOR

    profile = _snapshot_profile()
    assert profile.problems() == []
    path = tmp_path / "conditions.csv"
    path.write_text("START,PATIENT,CODE,DESCRIPTION\n03/05/2026,p1,44054006,Diabetes\n03/05/2026,,38341003,x\n"
                    ",,,\n", encoding="utf-8")
    result = read_csv_file(spark, path, "diagnosis", profile, LINEAGE)
    rows = sorted(result.bronze["diagnosis"].collect(), key=lambda r: r._source_line)
    assert [r.record_action for r in rows] == ["upsert"] * 3 and result.quarantine.count() == 0
    assert [r.condition_system for r in rows] == ["SNOMED"] * 3
    s = DERIVED_ID_SEPARATOR
    # Empty parts keep their place; a record with none has no id (validation quarantines it).
    assert [r.diagnosis_ref for r in rows] == [f"p1{s}44054006{s}03/05/2026", f"{s}38341003{s}03/05/2026", None]


def test_linkage_identifiers_of_a_csv_patient_file_are_kept_as_json(spark, tmp_path):
    import json

    profile = _snapshot_profile()
    path = tmp_path / "patients.csv"
    path.write_text("Id,BIRTHDATE,SSN,MPI\np1,01/02/1960,999-00-1111,100-007-9192\np2,01/02/1961,,\n", encoding="utf-8")
    rows = {r.patient_ref: r for r in read_csv_file(spark, path, "patient", profile, LINEAGE).bronze["patient"].collect()}
    assert json.loads(rows["p1"].person_identifiers) == {"enterprise_mpi": "100-007-9192"}
    assert rows["p2"].person_identifiers is None
    assert "999-00-1111" not in str(rows["p1"])  # an ignored column is never read


def test_header_drift_is_judged_against_every_header_the_profile_expects():
    from jobs.readers.csv import header_drift

    profile = _snapshot_profile()
    expected = profile.expected_headers("diagnosis")
    assert header_drift(["START", "PATIENT", "CODE", "DESCRIPTION"], expected) == ""
    assert header_drift(["START", "PATIENT", "CODE", "DESC"], expected) == "missing ['DESCRIPTION'], unexpected ['DESC']"
    assert set(profile.expected_headers("patient")) == {"Id", "BIRTHDATE", "SSN", "MPI"}


def test_a_file_missing_a_column_its_derived_id_is_built_from_is_refused(spark, tmp_path):
    path = tmp_path / "conditions.csv"
    path.write_text("PATIENT,CODE\np1,44054006\n", encoding="utf-8")
    with pytest.raises(HeaderError, match=r"no \['START'\] column\(s\), which derived_ids.diagnosis builds"):
        read_csv_file(spark, path, "diagnosis", _snapshot_profile(), LINEAGE)


def test_a_sequence_within_derived_ids_keeps_two_same_second_measurements(spark, tmp_path):
    """Synthea-like observations: two oxygen saturations of one patient in the same minute share the
    derived id; with derived_id_sequence both get their own id (by content, not line order), and an
    exact duplicate line keeps its twin's id so it is still dropped as a duplicate."""
    from jobs.core.config import CsvProfile
    from jobs.readers.csv import DERIVED_ID_SEPARATOR

    columns = {"lab_result": {"DATE": "measured_at", "PATIENT": "patient_ref", "ENCOUNTER": "encounter_ref",
                              "CODE": "loinc_code", "VALUE": "value", "UNITS": "unit"}}
    derived = {"lab_result": ["PATIENT", "ENCOUNTER", "CODE", "DATE"]}
    common = dict(format="csv", delimiter=",", encoding="utf-8", date_format="MM/dd/yyyy",
                  datetime_format="MM/dd/yyyy HH:mm", default_action="upsert", columns=columns, derived_ids=derived,
                  ignored_columns={"lab_result": ["DESCRIPTION", "TYPE"]})
    path = tmp_path / "observations.csv"
    path.write_text("DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,VALUE,UNITS,TYPE\n"
                    "03/05/2026 09:10,p1,e1,2708-6,Oxygen saturation,97.0,%,numeric\n"
                    "03/05/2026 09:10,p1,e1,2708-6,Oxygen saturation,94.0,%,numeric\n"
                    "03/05/2026 09:10,p1,e1,2708-6,Oxygen saturation,97.0,%,numeric\n"
                    "03/05/2026 09:10,p1,e1,718-7,Hemoglobin,13.1,g/dL,numeric\n", encoding="utf-8")
    s = DERIVED_ID_SEPARATOR
    key = f"p1{s}e1{s}2708-6{s}03/05/2026 09:10"

    plain = read_csv_file(spark, path, "lab_result", CsvProfile(**common), LINEAGE).bronze["lab_result"]
    assert sorted(r.lab_result_ref for r in plain.collect()).count(key) == 3  # two records, one id

    profile = CsvProfile(**common, derived_id_sequence=["lab_result"])
    assert profile.problems() == []
    rows = read_csv_file(spark, path, "lab_result", profile, LINEAGE).bronze["lab_result"].collect()
    refs = {r._source_line: (r.lab_result_ref, r.value) for r in rows}
    assert refs == {2: (f"{key}{s}2", "97.0"), 3: (f"{key}{s}1", "94.0"), 4: (f"{key}{s}2", "97.0"),
                    5: (f"p1{s}e1{s}718-7{s}03/05/2026 09:10{s}1", "13.1")}

    # Line order does not decide: the export reversed gives every row the same id.
    path.write_text("\n".join([path.read_text(encoding="utf-8").splitlines()[0],
                               *reversed(path.read_text(encoding="utf-8").splitlines()[1:])]) + "\n", encoding="utf-8")
    again = read_csv_file(spark, path, "lab_result", profile, LINEAGE).bronze["lab_result"].collect()
    assert sorted((r.lab_result_ref, r.value) for r in again) == sorted(refs.values())

    unnumbered = CsvProfile(**{**common, "derived_ids": {}}, derived_id_sequence=["lab_result"])
    assert ("derived_id_sequence.lab_result", "a sequence numbers derived ids: list the headers the record id is "
            "built from under derived_ids.lab_result") in unnumbered.problems()


def test_synthea_stop_reason_category_and_dispense_columns_map_to_their_canonical_columns(spark, tmp_path):
    """Synthea's STOP (conditions, medications), REASONCODE (encounters) and CATEGORY (observations),
    and a pharmacy's dispense date, mapped under ``columns`` like any other header; the constant
    code system of the reasons comes from ``constants``, a category word from ``value_maps``."""
    from jobs.core.config import CsvProfile

    profile = CsvProfile(
        format="csv", delimiter=",", encoding="utf-8", date_format="yyyy-MM-dd",
        datetime_format="yyyy-MM-dd'T'HH:mm:ss'Z'", default_action="upsert",
        columns={"encounter": {"Id": "encounter_ref", "PATIENT": "patient_ref", "START": "visit_start",
                               "REASONCODE": "reason_code"},
                 "diagnosis": {"PATIENT": "patient_ref", "CODE": "condition_code", "START": "condition_date",
                               "STOP": "condition_end_date"},
                 "lab_result": {"PATIENT": "patient_ref", "CODE": "loinc_code", "DATE": "measured_at",
                                "CATEGORY": "category"},
                 "medication": {"PATIENT": "patient_ref", "CODE": "drug_code", "START": "start_date",
                                "STOP": "end_date", "DISPENSED": "dispense_date"}},
        derived_ids={"diagnosis": ["PATIENT", "CODE", "START"], "lab_result": ["PATIENT", "CODE", "DATE"],
                     "medication": ["PATIENT", "CODE", "START"]},
        constants={"encounter": {"reason_system": "SNOMED"}},
        value_maps={"category": {"Biochimie": "laboratory"}})
    assert profile.problems() == []
    files = {
        "encounter": "Id,PATIENT,START,REASONCODE\ne1,p1,2026-03-05T09:10:00Z,44054006\ne2,p1,2026-03-06T09:10:00Z,\n",
        "diagnosis": "START,STOP,PATIENT,CODE\n2026-03-05,2026-04-20,p1,44054006\n2026-03-06,,p1,38341003\n",
        "lab_result": "DATE,PATIENT,CODE,CATEGORY\n2026-03-05T09:10:00Z,p1,8302-2,vital-signs\n"
                      "2026-03-05T09:10:00Z,p1,2339-0,Biochimie\n",
        "medication": "START,STOP,PATIENT,CODE,DISPENSED\n2026-03-05,2026-06-05,p1,860975,2026-03-06\n",
    }
    bronze = {}
    for dataset, text in files.items():
        path = tmp_path / f"{dataset}.csv"
        path.write_text(text, encoding="utf-8")
        bronze[dataset] = sorted(read_csv_file(spark, path, dataset, profile, LINEAGE).bronze[dataset].collect(),
                                 key=lambda r: r._source_line)
    assert [(r.reason_code, r.reason_system) for r in bronze["encounter"]] == [("44054006", "SNOMED"), (None, "SNOMED")]
    assert [r.condition_end_date for r in bronze["diagnosis"]] == ["2026-04-20", None]
    assert [r.category for r in bronze["lab_result"]] == ["vital-signs", "laboratory"]
    assert [(r.end_date, r.dispense_date) for r in bronze["medication"]] == [("2026-06-05", "2026-03-06")]
