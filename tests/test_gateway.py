"""The researcher gateway in process (FastAPI TestClient): tokens, membership, escapes, audit chain."""

from __future__ import annotations

import datetime as dt
import io
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from jobs.research.gateway.audit import read_audit, verify, verify_rows
from jobs.research.gateway.server import GatewaySettings
from jobs.research.gateway.tokens import TokenStore
from tests.conftest import CONFIG_DIR
from tests.gateway_helpers import (MEMBER, OTHER_MEMBER, OTHER_PROJECT, PROJECT, SILVER_SECRET, make_config,
                                   make_lake, remove_member)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway")
    lake = make_lake(root / "lake")
    config = make_config(CONFIG_DIR, root / "config")
    settings = GatewaySettings.from_env(lake_root=lake.root, config_dir=config, token_store=root / "tokens.jsonl")
    from jobs.research.gateway.app import create_app

    client = TestClient(create_app(settings))
    store = TokenStore(settings.token_store)
    return {"lake": lake, "config": config, "client": client, "store": store, "root": root}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def member_token(env):
    return env["store"].issue(PROJECT, MEMBER)[0]


def post_query(env, token, sql, project=PROJECT):
    return env["client"].post(f"/v1/projects/{project}/query", json={"sql": sql}, headers=bearer(token))


def audit_rows(env):
    return read_audit(env["lake"]).to_pylist()


def test_member_query_returns_rows_and_is_audited_first(env, member_token):
    response = post_query(env, member_token, "SELECT person_id, year_of_birth FROM patient ORDER BY person_id")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["columns"] == ["person_id", "year_of_birth"] and len(body["rows"]) == 15
    row = next(r for r in audit_rows(env) if r["event_id"] == body["audit_event"])
    assert (row["user"], row["project_id"], row["outcome"], row["rows_returned"]) == (MEMBER, PROJECT, "allowed", 15)
    assert row["sql"].startswith("SELECT person_id") and row["purpose"] == "research_general"
    assert row["token_id"] and row["token_id"] in member_token


def test_export_csv_and_parquet(env, member_token):
    sql = "SELECT visit_occurrence_id, visit_source_value FROM encounter ORDER BY 1"
    csv = env["client"].post(f"/v1/projects/{PROJECT}/export", json={"sql": sql, "format": "csv"},
                             headers=bearer(member_token))
    assert csv.status_code == 200 and csv.text.splitlines()[0] == '"visit_occurrence_id","visit_source_value"'
    assert len(csv.text.splitlines()) == 31
    parquet = env["client"].post(f"/v1/projects/{PROJECT}/export", json={"sql": sql, "format": "parquet"},
                                 headers=bearer(member_token))
    assert parquet.status_code == 200 and pq.read_table(io.BytesIO(parquet.content)).num_rows == 30
    assert int(parquet.headers["x-affluent-rows"]) == 30


def test_tokens_unknown_expired_revoked_and_other_project(env, member_token):
    store = env["store"]
    before = len(audit_rows(env))
    expired, _ = store.issue(PROJECT, MEMBER, expires=dt.date(2026, 1, 31))  # the suite's today is 2026-06-15
    revoked, record = store.issue(PROJECT, MEMBER)
    store.revoke(record.token_id)
    other, _ = store.issue(OTHER_PROJECT, OTHER_MEMBER)
    forged = member_token[:-4] + ("AAAA" if not member_token.endswith("AAAA") else "BBBB")
    sql = "SELECT count(*) AS n FROM patient"
    for token, status in [("", 401), ("not-a-token", 401), (forged, 401), (expired, 401), (revoked, 401),
                          (other, 403)]:
        response = post_query(env, token, sql)
        assert response.status_code == status, (token, response.text)
        assert "rows" not in response.json()
    new = audit_rows(env)[before:]
    assert len(new) == 6 and all(r["outcome"] == "refused" and r["rows_returned"] is None for r in new)
    assert [r["user"] for r in new][-1] == OTHER_MEMBER  # the user comes from the token
    assert {r["user"] for r in new[:-1]} == {"(unauthenticated)"}
    listed = {r.token_id: r.state(dt.date(2026, 6, 15)) for r in store.records().values()}
    assert listed[record.token_id] == "revoked" and "expired" in listed.values()


def test_removed_member_loses_access_at_once(env, tmp_path):
    from jobs.research.gateway.app import create_app

    config = tmp_path / "config"
    shutil.copytree(env["config"], config)
    settings = GatewaySettings.from_env(lake_root=env["lake"].root, config_dir=config,
                                        token_store=tmp_path / "tokens.jsonl")
    client = TestClient(create_app(settings))
    token, _ = TokenStore(settings.token_store).issue(PROJECT, "bob.gagnon")
    sql = {"sql": "SELECT count(*) AS n FROM patient"}
    assert client.post(f"/v1/projects/{PROJECT}/query", json=sql, headers=bearer(token)).status_code == 200
    remove_member(config, PROJECT, "bob.gagnon")
    response = client.post(f"/v1/projects/{PROJECT}/query", json=sql, headers=bearer(token))
    assert response.status_code == 403 and "not a member" in response.json()["message"]


def escapes(lake_root: str) -> list[str]:
    long_sql = "SELECT person_id FROM patient WHERE " + " OR ".join(f"person_id = 'p{i:05d}'" for i in range(2000))
    return [
        # files and URLs as tables, file readers and table functions
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_csv_auto('/etc/passwd')",
        "SELECT * FROM read_csv('/etc/passwd', header=false)",
        f"SELECT * FROM '{lake_root}/silver/patient/*.parquet'",
        "SELECT * FROM read_parquet('s3://affluent-lake/lake/silver/patient/*.parquet')",
        "SELECT * FROM 's3://affluent-lake/lake/silver/patient/part-0.parquet'",
        f"SELECT * FROM delta_scan('{lake_root}/silver/patient')",
        f"SELECT * FROM parquet_scan('{lake_root}/silver/patient/x.parquet')",
        "SELECT * FROM read_text('/proc/self/environ')",
        "SELECT * FROM read_blob('/etc/hostname')",
        "SELECT * FROM glob('/*')",
        "SELECT * FROM read_json_auto('/etc/x.json')",
        "SELECT * FROM sqlite_scan('/tmp/x.db', 't')",
        "SELECT * FROM encounter, read_csv('/etc/passwd') AS f",
        "SELECT * FROM query('SELECT * FROM read_csv(''/etc/passwd'')')",
        "SELECT * FROM query_table('q_encounter')",
        # extensions, settings
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "PRAGMA database_list",
        "RESET lock_configuration",
        "CALL pragma_version()",
        # variables, substitutions, environment
        "SELECT ${env:AFFLUENT_PSEUDONYM_KEY} AS k FROM patient",
        "SELECT getvariable('AFFLUENT_PSEUDONYM_KEY') AS k FROM patient",
        "SELECT current_setting('temp_directory') AS k FROM patient",
        "SELECT getenv('AFFLUENT_PSEUDONYM_KEY') AS k FROM patient",
        # script transforms and reflection
        "SELECT TRANSFORM(person_id) USING 'cat /etc/passwd' AS (x) FROM patient",
        "SELECT reflect('java.lang.System', 'getenv', 'AFFLUENT_PSEUDONYM_KEY') FROM patient",
        "SELECT java_method('java.lang.System', 'getenv', 'AFFLUENT_PSEUDONYM_KEY') FROM patient",
        # several statements and comment tricks
        "SELECT person_id FROM patient; SELECT * FROM silver.patient",
        "SELECT person_id FROM patient;-- \nATTACH '/tmp/x.db' AS x",
        "SELECT person_id FROM patient /* */; COPY patient TO '/tmp/out.csv'",
        "/* SELECT */ DROP TABLE q_patient",
        # CTEs shadowing other projects' and zones' names
        "WITH patient AS (SELECT * FROM silver.patient) SELECT * FROM patient",
        f"WITH x AS (SELECT * FROM {OTHER_PROJECT}.patient) SELECT * FROM x",
        "WITH encounter AS (SELECT * FROM bronze.patient) SELECT * FROM encounter",
        # other projects, other zones, the views themselves
        f"SELECT * FROM {OTHER_PROJECT}.patient",
        f"SELECT * FROM projects.{OTHER_PROJECT}.patient",
        "SELECT * FROM silver.patient",
        'SELECT * FROM "silver"."encounter"',
        "SELECT * FROM bronze.patient",
        "SELECT * FROM ops.batch_log",
        "SELECT * FROM ops.access_audit",
        "SELECT * FROM q_patient",
        "SELECT person_id FROM patient UNION ALL SELECT person_id FROM silver.patient",
        "SELECT (SELECT max(note) FROM silver.patient) AS n FROM patient",
        # metadata catalogs
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM duckdb_settings()",
        "SELECT * FROM duckdb_tables()",
        "SELECT * FROM duckdb_secrets()",
        "SELECT * FROM pg_catalog.pg_tables",
        "SELECT * FROM duckdb_settings",
        # time travel
        "SELECT * FROM patient VERSION AS OF 0",
        "SELECT * FROM patient AT (VERSION => 0)",
        "SELECT * FROM patient TIMESTAMP AS OF '2020-01-01'",
        # size, writes, other databases
        long_sql,
        "COPY patient TO '/tmp/out.csv'",
        "COPY (SELECT * FROM patient) TO '/tmp/out.parquet' (FORMAT parquet)",
        f"ATTACH '{lake_root}/silver.duckdb' AS s",
        "EXPORT DATABASE '/tmp/dump'",
        "CREATE TABLE t AS SELECT * FROM patient",
        "SELECT * INTO t FROM patient",
        "DESCRIBE patient",
        "SHOW TABLES",
        "SUMMARIZE patient",
    ]


def test_escape_list_is_long_and_distinct(env):
    assert len(set(escapes(env["lake"].root))) >= 40


@pytest.mark.parametrize("index", range(len(escapes("/lake"))))
def test_escape_attempt_is_refused_and_audited(env, member_token, index):
    sql = escapes(env["lake"].root)[index]
    before = len(audit_rows(env))
    response = post_query(env, member_token, sql)
    assert response.status_code in (400, 403), response.text
    body = response.json()
    assert "rows" not in body and body["errorCode"] == "QUERY_REFUSED"
    assert SILVER_SECRET not in response.text and "root:" not in response.text
    new = audit_rows(env)[before:]
    assert len(new) == 1 and new[0]["outcome"] == "refused" and new[0]["user"] == MEMBER
    assert new[0]["sql"] == sql[:20_000] and new[0]["reason"]


def test_audit_verify_detects_deleted_and_altered_rows(env, tmp_path, member_token, capsys):
    from deltalake import write_deltalake

    from jobs.app.cli import main
    from jobs.core.lake import Lake

    post_query(env, member_token, "SELECT count(*) AS n FROM patient")
    rows = audit_rows(env)
    assert len(rows) >= 3 and verify(env["lake"]).ok
    assert main(["audit", "verify", "--lake", env["lake"].root]) == 0
    schema = read_audit(env["lake"]).schema

    def tampered(name, change):
        lake = Lake(str(tmp_path / name))
        copy = [dict(r) for r in rows]
        change(copy)
        write_deltalake(lake.ops("access_audit"), pa.Table.from_pylist(copy, schema=schema))
        return lake

    deleted = tampered("deleted", lambda rs: rs.pop(1))
    altered = tampered("altered", lambda rs: rs[1].update(user="someone.else"))
    assert main(["audit", "verify", "--lake", deleted.root]) == 1
    assert "missing (deleted)" in capsys.readouterr().err
    assert main(["audit", "verify", "--lake", altered.root]) == 1
    assert "altered" in capsys.readouterr().err
    reordered = [dict(r) for r in rows]
    reordered[0]["seq"], reordered[1]["seq"] = reordered[1]["seq"], reordered[0]["seq"]
    assert not verify_rows(reordered).ok


def test_time_row_and_size_limits(env, member_token, tmp_path):
    from jobs.research.access import Limits
    from jobs.research.gateway.app import create_app

    settings = GatewaySettings.from_env(lake_root=env["lake"].root, config_dir=env["config"],
                                        token_store=env["store"].path)
    client = TestClient(create_app(settings, limits=Limits(max_rows=10, timeout_seconds=0.5, max_sql_bytes=200)))

    def ask(sql):
        return client.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=bearer(member_token))

    slow = ask("SELECT count(*) AS n FROM patient a, patient b, patient c, patient d, patient e, patient f, "
               "patient g, patient h")
    assert slow.status_code == 400 and "longer than 0.5 s" in slow.json()["message"]
    many = ask("SELECT person_id FROM encounter")
    assert many.status_code == 400 and "more than 10 rows" in many.json()["message"]
    big = ask("SELECT person_id FROM patient WHERE " + " OR ".join(["person_id = 'x'"] * 20))
    assert big.status_code == 400 and "at most 200" in big.json()["message"]
    assert ask("SELECT person_id FROM patient LIMIT 5").status_code == 200


def test_aggregate_only_project_answers_differentially_private_statistics(env, tmp_path):
    from jobs.research.gateway.app import create_app

    settings = GatewaySettings.from_env(lake_root=env["lake"].root, config_dir=CONFIG_DIR,  # shipped: aggregates only
                                        token_store=tmp_path / "tokens.jsonl")
    client = TestClient(create_app(settings))
    headers = bearer(TokenStore(settings.token_store).issue(PROJECT, MEMBER)[0])
    sql = "SELECT visit_source_value, count(DISTINCT person_id) AS persons FROM encounter GROUP BY 1"
    answer = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["columns"] == ["visit_source_value", "persons", "persons_low95", "persons_high95"]
    # The keys are the declared public values (outpatient has no visit in the data), never read from the data.
    assert [r[0] for r in body["rows"]] == ["emergency", "inpatient", "outpatient"]
    assert all(r[1] is None or (r[1] % 5 == 0 and r[1] >= 11 and r[2] <= r[1] <= r[3]) for r in body["rows"])
    assert body["privacy"]["epsilon"] == 0.1 and body["privacy"]["budget_left"]["epsilon"] < 1.0
    exported = client.post(f"/v1/projects/{PROJECT}/export", json={"sql": sql, "format": "csv"}, headers=headers)
    assert exported.status_code == 200 and exported.headers["x-affluent-epsilon"] == "0.1"
    for person_level in ("SELECT person_id FROM patient", "SELECT * FROM encounter"):
        refused = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": person_level}, headers=headers)
        assert refused.status_code == 400 and "rows" not in refused.json()
        refused = client.post(f"/v1/projects/{PROJECT}/export", json={"sql": person_level, "format": "parquet"},
                              headers=headers)
        assert refused.status_code == 400 and not refused.content.startswith(b"PAR1")


def test_steward_cli_issues_lists_and_revokes_tokens(env, tmp_path, monkeypatch, capsys):
    from jobs.app.cli import main

    monkeypatch.setenv("AFFLUENT_TOKEN_STORE", str(tmp_path / "tokens.jsonl"))
    monkeypatch.setenv("AFFLUENT_CONFIG_DIR", str(env["config"]))
    assert main(["token", "issue", "--project", PROJECT, "--user", MEMBER, "--expires", "2027-01-31"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("aff_") and token not in (tmp_path / "tokens.jsonl").read_text()
    token_id = token.split("_")[1]
    assert main(["token", "list"]) == 0
    listing = capsys.readouterr().out
    assert token_id in listing and "active" in listing and "2027-01-31" in listing and token not in listing
    assert main(["token", "revoke", token_id]) == 0
    assert main(["token", "list"]) == 0
    assert f"{token_id}" in (out := capsys.readouterr().out) and "revoked" in out
    assert main(["token", "issue", "--project", PROJECT, "--user", "mallory"]) == 2


def test_sql_errors_say_what_is_wrong_without_quoting_data(env, member_token):
    typo = post_query(env, member_token, "SELECT no_such_column FROM patient")
    assert typo.status_code == 400 and "no_such_column" in typo.json()["message"]
    cast = post_query(env, member_token, "SELECT CAST(person_id AS INTEGER) AS x FROM patient")
    assert cast.status_code == 400 and "ConversionException" in cast.json()["message"]
    assert "p0" not in cast.text  # the value that failed to convert stays in the audit, not in the answer
    assert audit_rows(env)[-1]["outcome"] == "failed" and "p0" in audit_rows(env)[-1]["reason"]


def test_config_or_token_store_holding_the_lake_is_refused(tmp_path):
    from jobs.research.gateway.confine import ConfinementUnavailable
    from jobs.research.gateway.server import confinement_for

    settings = GatewaySettings.from_env(lake_root=str(tmp_path / "lake"), config_dir=CONFIG_DIR,
                                        token_store=tmp_path / "tokens.jsonl")
    with pytest.raises(ConfinementUnavailable, match="contains the lake"):
        confinement_for(settings, tmp_path / "tmp")


def test_without_landlock_the_gateway_refuses_unless_told_unconfined(tmp_path, monkeypatch, capsys):
    import tempfile

    from jobs.research.gateway import confine
    from jobs.research.gateway.server import lock_down

    monkeypatch.setattr(confine, "landlock_abi", lambda: 0)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.gettempdir())  # lock_down moves it: restored after the test
    monkeypatch.setenv("TMPDIR", tempfile.gettempdir())
    for name in ("AFFLUENT_PSEUDONYM_KEY", "AFFLUENT_PSEUDONYM_KEY_FILE", "AIRFLOW_CONN_AFFLUENT_PSEUDONYM_KEY"):
        monkeypatch.delenv(name, raising=False)
    settings = GatewaySettings.from_env(lake_root=str(tmp_path / "lake"), config_dir=CONFIG_DIR,
                                        token_store=tmp_path / "access" / "tokens.jsonl", temp_dir=tmp_path)
    with pytest.raises(confine.ConfinementUnavailable, match="--unconfined"):
        lock_down(settings)
    private = lock_down(settings, unconfined=True)
    assert "UNCONFINED" in capsys.readouterr().err and private.is_dir()


@pytest.mark.parametrize("header, size, expected", [
    (None, 10, (0, 9)), ("bytes=0-3", 10, (0, 3)), ("bytes=5-", 10, (5, 9)), ("bytes=-4", 10, (6, 9)),
    ("bytes=8-20", 10, (8, 9)), ("bytes=10-", 10, None), ("bytes=4-2", 10, None), ("bytes=1-2,4-5", 10, None),
    ("items=1-2", 10, None), ("bytes=a-b", 10, None)])
def test_file_downloads_honour_one_http_byte_range(header, size, expected):
    from jobs.research.gateway.sharing import byte_range

    assert byte_range(header, size) == expected


def test_csv_neutralises_every_type_and_lists_and_structs_export(env, member_token):
    sql = ("SELECT '=1+1'::BLOB AS b, CAST('=1+1' AS ENUM('=1+1', 'x')) AS e, [visit_source_value, '=2+2'] AS l, "
           "{'k': '@SUM(A1)'} AS s, -5 AS n FROM encounter LIMIT 1")
    csv = env["client"].post(f"/v1/projects/{PROJECT}/export", json={"sql": sql, "format": "csv"},
                             headers=bearer(member_token))
    assert csv.status_code == 200, csv.text
    cells = [c.strip('"') for c in csv.text.splitlines()[1].split('","')]
    assert cells[0] == "'=1+1" and cells[1] == "'=1+1" and csv.text.splitlines()[1].endswith(",-5")
    assert not any(c.startswith(("=", "@", "+")) for c in cells)
    for fmt in ("parquet", "csv"):
        nested = env["client"].post(f"/v1/projects/{PROJECT}/export", json={
            "sql": "SELECT list(visit_source_value) AS l, {'n': count(*)} AS s FROM encounter", "format": fmt},
            headers=bearer(member_token))
        assert nested.status_code == 200, nested.text
        assert audit_rows(env)[-1]["outcome"] == "allowed"


def test_deep_nesting_is_a_clear_refusal_and_audited(env, member_token):
    sql = "SELECT count(*) AS n FROM patient WHERE " + "(" * 3000 + "1 = 1" + ")" * 3000
    response = post_query(env, member_token, sql)
    assert response.status_code == 400, response.text
    assert audit_rows(env)[-1]["sql"] == sql and audit_rows(env)[-1]["outcome"] in ("refused", "failed")


def test_cross_join_spill_is_capped_and_audited(env, member_token, tmp_path, monkeypatch):
    import tempfile

    from jobs.research.access import Limits
    from jobs.research.gateway.app import create_app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    settings = GatewaySettings.from_env(lake_root=env["lake"].root, config_dir=env["config"],
                                        token_store=env["store"].path)
    client = TestClient(create_app(settings, limits=Limits(memory_limit="64MB", max_temp_size="16MB",
                                                           timeout_seconds=60, threads=1)))
    sql = ("SELECT count(DISTINCT a.visit_occurrence_id || b.visit_occurrence_id || c.visit_occurrence_id || "
           "d.visit_occurrence_id || e.visit_occurrence_id) AS n FROM encounter a, encounter b, encounter c, "
           "encounter d, encounter e")
    response = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=bearer(member_token))
    assert response.status_code == 400 and "rows" not in response.json()
    spilled = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert spilled <= 16 * 2**20
    rows = [r for r in audit_rows(env) if r["sql"] == sql]
    assert [r["outcome"] for r in rows] == ["requested", "failed"] and "max_temp_directory_size" in rows[1]["reason"]
