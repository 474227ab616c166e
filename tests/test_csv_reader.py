import datetime as dt

import pytest

from jobs.readers.csv import HeaderError, FileLineage, read_csv_file

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
        b'M004;"unbalanced;x;y;z;1;2;3;4;5;6;7;A',            # unbalanced quote
        good.replace("M001", "M005").encode("latin-1").replace(b"Montr", b"Mon\x85tr"),  # C1 control byte
        b"",                                                    # blank line: not a record
        good.replace("M001", "M006").replace(";A", ";Z").encode("latin-1"),  # unknown action
        '"M007";"TREM85521512";"Tremblay; fils";Luc;01/01/1990;M;;;;;;;M'.encode("latin-1"),  # quoted delimiter
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
        6: "ingest.encoding", 8: "ingest.unknown_action",
    }
    assert "patient.csv line 3: 3 fields, the header has 13" in quarantine[3].reason
    for row in quarantine.values():  # nothing identifying in quarantine
        assert "TREM" not in (row.record_safe or "") + row.reason and "Gagnon" not in row.reason


def test_header_without_action_column_is_refused(spark, consortium, tmp_path):
    profile = consortium.establishments["chu_laurentides"].input
    path = _write(tmp_path, [b"no_dossier;nam", b"M1;X"])
    with pytest.raises(HeaderError, match="line 1: no action column"):
        read_csv_file(spark, path, "patient", profile, LINEAGE)
