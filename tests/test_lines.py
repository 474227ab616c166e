import pytest

from jobs.readers.lines import decode_strict, in_one_partition, join_quoted_lines, read_lines


@pytest.mark.parametrize("split", [True, False], ids=["several-partitions", "one-partition"])
def test_lines_keep_numbers_and_bytes_across_partitions(spark, tmp_path, split):
    path = tmp_path / "f.csv"
    lines = [f"row{i};é".encode("latin-1") for i in range(5000)]
    lines[1234] = b"bad\x81byte"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    if split:
        spark.conf.set("spark.sql.files.maxPartitionBytes", "16k")  # several splits of one file
    try:
        assert in_one_partition(spark, str(path)) is not split
        df = read_lines(spark, str(path))
        text, valid = decode_strict("raw", "latin-1")
        got = {r.line_no: (r.t, r.ok) for r in df.select("line_no", text.alias("t"), valid.alias("ok")).collect()}
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    assert len(got) == 5000
    assert got[1] == ("row0;é", True)
    assert got[5000] == ("row4999;é", True)
    assert got[1235][1] is False


def test_a_file_planned_whole_and_then_split_fails_instead_of_misnumbering(spark, tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes(b"\n".join(f"row{i}".encode() for i in range(5000)) + b"\n")
    df = read_lines(spark, str(path))  # one partition when planned
    spark.conf.set("spark.sql.files.maxPartitionBytes", "4k")
    try:
        with pytest.raises(Exception, match="planned as one partition was read as several"):
            df.collect()
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")


def test_utf8_strict_decoding_flags_invalid_bytes_and_strips_bom(spark, tmp_path):
    path = tmp_path / "u.csv"
    path.write_bytes("\ufeffh1,h2\nok,é\n".encode("utf-8") + b"bad,\xe9\n")
    text, valid = decode_strict("raw", "utf-8-sig")
    rows = read_lines(spark, str(path)).select("line_no", text.alias("t"), valid.alias("ok")).orderBy("line_no").collect()
    assert [(r.t, r.ok) for r in rows] == [("h1,h2", True), ("ok,é", True), (None, False)]


@pytest.mark.parametrize("small", [False, True], ids=["per-bucket", "one-window"])
def test_a_1_mb_quoted_field_over_thousands_of_lines_is_joined_into_one_record(spark, small):
    paragraph = 'Patient admis; douleur ""thoracique"" irradiant.\nAntécédents: HTA; diabète.\n'
    body = (paragraph * (1_000_000 // len(paragraph) + 1))[:1_000_000].rstrip()
    physical = ["h1;h2", 'S1;"' + body + '"', "S2;court"]
    physical = [line for record in physical for line in record.split("\n")]
    lines = spark.createDataFrame(
        [(i, text, True, False, text.count('"') % 2 == 1) for i, text in enumerate(physical, start=1)],
        "line_no long, text string, valid boolean, mismatch boolean, odd boolean")
    records = sorted(join_quoted_lines(lines, small=small).collect())
    note_lines = body.count("\n") + 1
    assert note_lines > 20_000
    last = 1 + note_lines
    assert [(r.line_no, r.last_line) for r in records] == [(1, 1), (2, last), (last + 1, last + 1)]
    assert records[1].text == 'S1;"' + body + '"'
    assert records[2].text == "S2;court"
