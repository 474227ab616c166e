"""The gateway as its own process: no key, confined by Landlock, its CLI clients and Delta Sharing clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.research.gateway.confine import landlock_abi
from jobs.research.gateway.tokens import TokenStore
from tests.conftest import CONFIG_DIR
from tests.gateway_helpers import (KEY_VARIABLES, MEMBER, OTHER_MEMBER, OTHER_PROJECT, PROJECT, REPO, clean_env,
                                   encounters, free_port, make_config, make_lake, start_gateway, wait_healthy)

pytestmark = pytest.mark.skipif(landlock_abi() < 1, reason="Landlock is not available on this kernel")


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-process")
    lake = make_lake(root / "lake")
    config = make_config(CONFIG_DIR, root / "config")
    key_file = root / "secrets" / "pseudonym.key"
    key_file.parent.mkdir()
    key_file.write_text("0123456789abcdef" * 4)
    store = TokenStore(Path(lake.root) / "access" / "tokens.jsonl")
    port = free_port()
    process = start_gateway(lake, config, port)
    try:
        wait_healthy(process, port)
        yield {"lake": lake, "config": config, "store": store, "port": port, "process": process,
               "url": f"http://127.0.0.1:{port}", "key_file": key_file, "root": root}
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_gateway_process_holds_no_key_and_is_confined(running):
    import httpx

    environ = Path(f"/proc/{running['process'].pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert names and not names & set(KEY_VARIABLES)
    assert httpx.get(f"{running['url']}/v1/health").json() == {"status": "ok", "confined": True}


PROBE = """
import json, sys
from pathlib import Path
from jobs.research.gateway.server import GatewaySettings, lock_down
settings = GatewaySettings.from_env(lake_root=sys.argv[1], config_dir=sys.argv[2], token_store=sys.argv[3])
lock_down(settings)
outcome = {}
for path in sys.argv[4:]:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
        outcome[path] = "read"
    except PermissionError:
        outcome[path] = "denied"
    except OSError as exc:
        outcome[path] = f"error {exc.errno}"
print(json.dumps(outcome))
"""


def test_confinement_denies_other_zones_and_the_key_file(running):
    lake, root = Path(running["lake"].root), running["root"]

    def first_parquet(folder: Path) -> str:
        return str(next(folder.rglob("*.parquet")))

    allowed = [first_parquet(lake / "projects" / PROJECT / "patient"), str(running["config"] / "pipeline.yaml")]
    denied = [first_parquet(lake / "silver" / "patient"), first_parquet(lake / "bronze" / "patient"),
              first_parquet(lake / "ops" / "batch_log"), str(running["key_file"]), str(REPO / "pyproject.toml"),
              f"/proc/{os.getpid()}/environ"]  # another process's environment (where a pipeline keeps its key)
    probe = subprocess.run([sys.executable, "-c", PROBE, str(lake), str(running["config"]),
                            str(lake / "access" / "tokens.jsonl"), *allowed, *denied],
                           env=clean_env(), cwd=root, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    outcome = json.loads(probe.stdout.splitlines()[-1])
    assert [outcome[p] for p in allowed] == ["read"] * len(allowed)
    assert [outcome[p] for p in denied] == ["denied"] * len(denied)


@pytest.mark.parametrize("variable", KEY_VARIABLES)
def test_gateway_refuses_to_start_when_a_key_is_visible(running, variable):
    value = str(running["key_file"]) if variable.endswith("FILE") else "0123456789abcdef" * 4
    process = start_gateway(running["lake"], running["config"], free_port(), env=clean_env(**{variable: value}))
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "must not see the pseudonymisation key" in err and variable in err


def run_cli(running, token: str, *args: str) -> subprocess.CompletedProcess:
    env = clean_env(AFFLUENT_GATEWAY_URL=running["url"], AFFLUENT_TOKEN=token)
    return subprocess.run([sys.executable, "-m", "jobs.app.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_query_and_export_are_clients_of_the_gateway(running, tmp_path):
    token, _ = running["store"].issue(PROJECT, MEMBER)
    shown = run_cli(running, token, "query", "--project", PROJECT, "SELECT person_id FROM patient ORDER BY 1 LIMIT 2")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["person_id", "p00", "p01"]
    out = tmp_path / "encounters.csv"
    exported = run_cli(running, token, "export", "--project", PROJECT, "--out", str(out),
                       "SELECT visit_occurrence_id FROM encounter")
    assert exported.returncode == 0, exported.stderr
    assert len(out.read_text().splitlines()) == 31
    refused = run_cli(running, token, "query", "--project", PROJECT, "SELECT * FROM silver.patient")
    assert refused.returncode == 2 and "not one of project" in refused.stderr
    no_token = run_cli(running, "", "query", "--project", PROJECT, "SELECT 1 AS x FROM patient")
    assert no_token.returncode == 2


def sharing_profile(running, tmp_path, token: str) -> str:
    path = tmp_path / f"profile-{token[4:12]}.share"
    path.write_text(json.dumps({"shareCredentialsVersion": 1, "endpoint": f"{running['url']}/delta-sharing",
                                "bearerToken": token}))
    return str(path)


def test_delta_sharing_client_reads_exactly_the_extract(running, tmp_path):
    import delta_sharing

    token, record = running["store"].issue(PROJECT, MEMBER)
    profile = sharing_profile(running, tmp_path, token)
    client = delta_sharing.SharingClient(profile)
    assert [t.name for t in client.list_all_tables()] == ["encounter", "patient"]
    frame = delta_sharing.load_as_pandas(f"{profile}#{PROJECT}.extracts.encounter")
    expected = encounters().to_pandas()
    got = frame.sort_values("visit_occurrence_id").reset_index(drop=True)[list(expected.columns)]
    assert got.astype(str).values.tolist() == expected.astype(str).values.tolist()

    from jobs.research.gateway.audit import read_audit

    reads = [r for r in read_audit(running["lake"]).to_pylist()
             if r["engine"] == "delta-sharing" and r["token_id"] == record.token_id]
    assert reads and all(r["user"] == MEMBER for r in reads)
    assert any(r["rows_returned"] == 30 and r["outcome"] == "allowed" for r in reads)


def test_delta_sharing_other_project_and_revoked_tokens_get_nothing(running, tmp_path):
    import delta_sharing
    from requests.exceptions import HTTPError

    other, _ = running["store"].issue(OTHER_PROJECT, OTHER_MEMBER)
    profile = sharing_profile(running, tmp_path, other)
    with pytest.raises(HTTPError) as denied:
        delta_sharing.load_as_pandas(f"{profile}#{PROJECT}.extracts.patient")
    assert denied.value.response.status_code == 403
    # Its own share is aggregate-only: no table is shared.
    assert delta_sharing.SharingClient(profile).list_all_tables() == []

    revoked, record = running["store"].issue(PROJECT, MEMBER)
    running["store"].revoke(record.token_id)
    with pytest.raises(HTTPError) as unauthenticated:
        delta_sharing.load_as_pandas(f"{sharing_profile(running, tmp_path, revoked)}#{PROJECT}.extracts.patient")
    assert unauthenticated.value.response.status_code == 401


def test_demo_step_queries_through_its_own_gateway(tmp_path, capsys):
    """The demo's aggregate-only project: a differentially private answer with its epsilon and intervals."""
    from jobs.research.gateway.demo import show
    from jobs.research.gateway.tokens import default_store_path
    from tests.gateway_helpers import make_dp_lake

    lake = make_dp_lake(tmp_path / "lake")
    assert show(lake.root, CONFIG_DIR) == 0
    out = capsys.readouterr().out
    assert "confined by Landlock" in out and "audit event" in out and "visits_low95" in out
    assert "9202" in out and "spent epsilon 0.1" in out
    demo_tokens = [r for r in TokenStore(default_store_path(lake.root)).records().values() if r.token_id in out]
    assert len(demo_tokens) == 1 and demo_tokens[0].revoked_at  # the demo's token dies with its gateway


def test_file_urls_are_audited_and_die_with_their_token(running):
    import httpx

    token, record = running["store"].issue(PROJECT, MEMBER)
    headers = {"Authorization": f"Bearer {token}"}
    lines = httpx.post(f"{running['url']}/delta-sharing/shares/{PROJECT}/schemas/extracts/tables/patient/query",
                       json={}, headers=headers).text.splitlines()
    url = json.loads(lines[-1])["file"]["url"]
    assert httpx.get(url).content.startswith(b"PAR1")
    assert httpx.get(url.replace("sig=", "sig=0")).status_code == 403
    running["store"].revoke(record.token_id)
    assert httpx.get(url).status_code == 403

    from jobs.research.gateway.audit import read_audit

    files = [r for r in read_audit(running["lake"]).to_pylist()
             if r["token_id"] == record.token_id and (r["reason"] or "").startswith(("file", "token"))]
    assert [r["outcome"] for r in files] == ["allowed", "refused"] and files[0]["user"] == MEMBER


def test_killed_query_leaves_its_requested_row(running, tmp_path):
    """kill -9 while a query runs: the audit keeps the request, and the chain stays intact."""
    import threading
    import time

    import httpx

    from jobs.research.gateway.audit import read_audit, verify

    port = free_port()
    process = start_gateway(running["lake"], running["config"], port)
    wait_healthy(process, port)
    token, _ = running["store"].issue(PROJECT, MEMBER)
    sql = "SELECT count(*) AS n FROM " + ", ".join(f"encounter e{i}" for i in range(8))  # 30^8 rows to count

    def ask():
        try:
            httpx.post(f"http://127.0.0.1:{port}/v1/projects/{PROJECT}/query", json={"sql": sql},
                       headers={"Authorization": f"Bearer {token}"}, timeout=60)
        except httpx.HTTPError:
            pass  # the gateway dies under it

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(r["sql"] == sql for r in read_audit(running["lake"]).to_pylist()):
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=10)
    thread.join(timeout=30)
    rows = [r for r in read_audit(running["lake"]).to_pylist() if r["sql"] == sql]
    assert [r["outcome"] for r in rows] == ["requested"] and rows[0]["user"] == MEMBER
    assert verify(running["lake"]).ok


def test_confined_gateway_answers_an_aggregate_only_project_and_keeps_its_budget(tmp_path):
    """The shipped configuration (aggregate-only): OpenDP runs under Landlock, the ledger survives a restart."""
    import httpx

    from jobs.core import clock
    from jobs.core.config import load_consortium
    from jobs.privacy.privacy_budget import balance
    from tests.gateway_helpers import make_dp_lake

    lake = make_dp_lake(tmp_path / "lake")
    store = TokenStore(Path(lake.root) / "access" / "tokens.jsonl")
    token, _ = store.issue(PROJECT, MEMBER)
    sql = "SELECT visit_source_value, count(*) AS visits FROM encounter GROUP BY visit_source_value"
    lefts = []
    for _ in range(2):  # a second process reads the ledger the first one wrote
        port = free_port()
        process = start_gateway(lake, CONFIG_DIR, port)
        try:
            wait_healthy(process, port)
            response = httpx.post(f"http://127.0.0.1:{port}/v1/projects/{PROJECT}/query", json={"sql": sql},
                                  headers={"Authorization": f"Bearer {token}"}, timeout=60)
            assert response.status_code == 200, response.text
            lefts.append(response.json()["privacy"]["budget_left"]["epsilon"])
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert lefts == pytest.approx([0.9, 0.8])
    project = load_consortium(CONFIG_DIR).projects[PROJECT]
    assert balance(lake, project, MEMBER, clock.today()).member_epsilon == pytest.approx(0.8)
