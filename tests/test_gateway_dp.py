"""An aggregate-only project through the gateway: attack shapes, a scripted adversary, the privacy budget."""

from __future__ import annotations

import io
import math
import re

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from jobs.research.gateway.audit import read_audit
from jobs.research.gateway.server import GatewaySettings
from jobs.research.gateway.tokens import TokenStore
from jobs.privacy.privacy_budget import verify_ledger
from tests.conftest import CONFIG_DIR
from tests.gateway_helpers import (MEMBER, PROJECT, TARGET, TARGET_CODE, TARGET_LAB, make_dp_config, make_dp_lake)

PSEUDONYM = re.compile(r"\bp\d\d\b")
OTHERS_11 = ", ".join(f"'p{i:02d}'" for i in range(1, 12))
OTHERS_12 = ", ".join(f"'p{i:02d}'" for i in range(0, 12))

# The eight shapes that leaked through shape-reading output checks, with their variants.
ATTACKS = {
    "1 pseudonyms renamed through a table alias's column list":
        "SELECT upper(p) AS pid, g, y, z, count(*) AS n FROM (SELECT person_id, gender_source_value, year_of_birth, "
        "postal_prefix FROM patient) AS t(p, g, y, z) GROUP BY ALL",
    "1 every diagnosis": "SELECT upper(p) AS pid, c, count(*) AS n FROM (SELECT person_id, condition_source_value "
                         "FROM diagnosis) AS t(p, c) GROUP BY ALL",
    "1 every lab result": "SELECT p, v, count(*) AS n FROM (SELECT person_id, value_as_number FROM lab_result) "
                          "AS t(p, v) GROUP BY ALL",
    "1 every encounter without a pseudonym": "SELECT v, d, t, count(*) AS n FROM (SELECT visit_occurrence_id, "
                                             "visit_start_date, visit_source_value FROM encounter) AS x(v, d, t) "
                                             "GROUP BY ALL",
    "1 person_id as a key": "SELECT person_id, count(*) AS n FROM patient GROUP BY person_id",
    "1 a key not declared public": "SELECT visit_start_date, count(*) AS n FROM encounter GROUP BY visit_start_date",
    "2 CASE x WHEN on quasi-identifiers":
        "SELECT condition_source_value, sum(CASE concat_ws('|', year_of_birth, gender_source_value, postal_prefix) "
        "WHEN '1950|male|H2X' THEN 1 ELSE 0 END) AS n FROM diagnosis JOIN patient USING (person_id) "
        "GROUP BY condition_source_value",
    "2 CASE pseudonym WHEN": f"SELECT max(CASE person_id WHEN '{TARGET}' THEN value_as_number END) AS v "
                             "FROM lab_result",
    "3 UNION ALL padding": f"SELECT postal_prefix, count(*) AS n FROM (SELECT person_id, postal_prefix FROM patient "
                          f"WHERE person_id = '{TARGET}' UNION ALL SELECT person_id, postal_prefix FROM patient) "
                          "GROUP BY postal_prefix",
    "3 UNION ALL padding of one person's sum": f"SELECT sum(value_as_number) AS s FROM lab_result WHERE person_id = "
                                              f"'{TARGET}' UNION ALL SELECT 0 FROM patient",
    "4 sum(1) beside count(*)": "SELECT count(*) AS n, sum(1) AS s FROM encounter",
    "5 differencing pair, 11 ids": f"SELECT sum(value_as_number) AS s, count(*) AS n FROM lab_result "
                                   f"WHERE person_id NOT IN ({OTHERS_11})",
    "5 differencing pair, 12 ids": f"SELECT sum(value_as_number) AS s, count(*) AS n FROM lab_result "
                                   f"WHERE person_id NOT IN ({OTHERS_12})",
    "8 ORDER BY a count": "SELECT visit_source_value, count(*) AS n FROM encounter GROUP BY 1 ORDER BY n",
    "8 LIMIT": "SELECT visit_source_value, count(*) AS n FROM encounter GROUP BY 1 LIMIT 1",
    "8 HAVING": "SELECT visit_source_value, count(*) AS n FROM encounter GROUP BY 1 HAVING count(*) < 3",
    "window": "SELECT visit_source_value, count(*) OVER () AS n FROM encounter",
    "CTE": "WITH x AS (SELECT * FROM patient) SELECT count(*) AS n FROM x",
    "deep nesting": "SELECT count(*) AS n FROM encounter WHERE " + "(" * 3000 + "1=1" + ")" * 3000,
    "300 ORs": "SELECT count(*) AS n FROM encounter WHERE " + " OR ".join(
        f"visit_source_value = 'v{i:04d}'" for i in range(300)),
}


def _app(root, name, count_rounding=None, **privacy):
    from jobs.research.gateway.app import create_app

    config = make_dp_config(CONFIG_DIR, root / f"config-{name}", count_rounding, **privacy)
    settings = GatewaySettings.from_env(lake_root=str(root / "lake"), config_dir=config,
                                        token_store=root / "tokens.jsonl")
    return TestClient(create_app(settings)), settings


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-dp")
    lake = make_dp_lake(root / "lake")
    client, settings = _app(root, "wide", epsilon=20.0, project_epsilon=None)
    token = TokenStore(settings.token_store).issue(PROJECT, MEMBER)[0]
    return {"lake": lake, "client": client, "headers": {"Authorization": f"Bearer {token}"}, "root": root}


def ask(dp, sql, export=None):
    path = f"/v1/projects/{PROJECT}/{'export' if export else 'query'}"
    return dp["client"].post(path, json={"sql": sql} | ({"format": export} if export else {}), headers=dp["headers"])


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_shape_gets_no_person_out_and_is_audited(dp, name):
    sql = ATTACKS[name]
    before = read_audit(dp["lake"]).num_rows
    response = ask(dp, sql)
    assert response.status_code in (200, 400), response.text
    assert not PSEUDONYM.search(response.text) and str(TARGET_LAB) not in response.text
    if response.status_code == 200:  # only a DP release may come out
        assert response.json()["privacy"]["epsilon"] > 0
    else:
        assert response.json()["errorCode"] == "QUERY_REFUSED" and "rows" not in response.json()
    rows = read_audit(dp["lake"]).to_pylist()[before:]
    assert rows and rows[-1]["sql"] == sql[:20_000]
    assert rows[-1]["outcome"] == ("allowed" if response.status_code == 200 else "refused")


def test_pseudonym_shape_is_refused_as_an_export_too(dp):
    response = ask(dp, ATTACKS["1 pseudonyms renamed through a table alias's column list"], export="parquet")
    assert response.status_code == 400 and not response.content.startswith(b"PAR1")


def test_refusal_messages_carry_no_figure_from_the_data(dp, tmp_path):
    """The same refused SQL gets the same message whatever the data (here: target with or without the code)."""
    make_dp_lake(tmp_path / "lake", target_has_code=False)
    other, settings = _app(tmp_path, "other", epsilon=20.0, project_epsilon=None)
    headers = {"Authorization": f"Bearer {TokenStore(settings.token_store).issue(PROJECT, MEMBER)[0]}"}
    for sql in ATTACKS.values():
        mine = ask(dp, sql)
        theirs = other.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=headers)
        if mine.status_code == 400:
            assert theirs.status_code == 400 and mine.json()["message"] == theirs.json()["message"]


def test_release_keys_are_the_declared_values_and_cells_carry_intervals(dp):
    response = ask(dp, "SELECT visit_source_value, count(*) AS visits, avg(value_as_number) AS mean_value "
                       "FROM encounter JOIN lab_result ON encounter.person_id = lab_result.person_id "
                       "GROUP BY visit_source_value")
    assert response.status_code == 200, response.text
    body = response.json()
    # The formula value in the data is not a declared key: it cannot come out as one.
    assert [r[0] for r in body["rows"]] == ["emergency", "inpatient", "outpatient"]
    assert body["columns"] == ["visit_source_value", "visits", "visits_low95", "visits_high95", "mean_value",
                               "mean_value_low95", "mean_value_high95"]
    for row in body["rows"]:
        if row[1] is not None:
            assert row[1] % 5 == 0 and row[1] >= 11 and row[2] <= row[3]
            assert 0.0 <= row[5] <= row[4] <= row[6] <= 500.0
    assert body["privacy"]["epsilon"] == 0.1 and body["privacy"]["delta"] == 0
    csv = ask(dp, "SELECT visit_source_value, count(*) AS visits FROM encounter GROUP BY 1", export="csv")
    assert csv.status_code == 200 and "=1+1" not in csv.text and csv.headers["x-affluent-epsilon"] == "0.1"


def test_partition_selection_spends_delta_and_differencing_on_quasi_identifiers_is_noisy(dp):
    keys = ask(dp, "SELECT condition_source_value, count(*) AS n FROM diagnosis GROUP BY 1")
    assert keys.status_code == 200 and keys.json()["privacy"]["delta"] > 0
    # The target's two diagnoses can never pass the threshold as a key of their own.
    assert TARGET_CODE not in keys.text
    base = "SELECT sum(value_as_number) AS s FROM lab_result JOIN patient USING (person_id)"
    everyone, without = ask(dp, base), ask(dp, base + " WHERE year_of_birth <> 1950")
    assert everyone.status_code == without.status_code == 200
    totals = [everyone.json()["rows"][0][0], without.json()["rows"][0][0]]
    # The pair no longer gives the target's total: each sum is noisy (or suppressed when its noisy count is small).
    assert None in totals or abs(totals[0] - totals[1] - 2 * TARGET_LAB) > 1.0


def _adversary(client, headers, rounds: int):
    """Differencing: diagnoses E11.9 with and without the target's birth year, asked again and again."""
    with_target = "SELECT count(*) AS n FROM diagnosis WHERE condition_source_value = 'E11.9'"
    without = ("SELECT count(*) AS n FROM diagnosis JOIN patient USING (person_id) "
               "WHERE condition_source_value = 'E11.9' AND year_of_birth <> 1950")
    differences, refused = [], None
    for _ in range(rounds):
        answers = []
        for sql in (with_target, without):
            response = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=headers)
            if response.status_code != 200:
                refused = response.json()["message"]
                break
            answers.append(response.json()["rows"][0][0] or 0)  # a suppressed cell reads as 0
        if refused:
            break
        differences.append(answers[0] - answers[1])
    return differences, refused


def test_scripted_adversary_stays_within_epsilon_and_the_budget_stops_it(tmp_path):
    """Guess whether the target's diagnoses are E10.9 (difference 0) or E11.9 (difference 2), in both worlds.

    Rounding is off (base 1) so that only the noise stands between the
    adversary and exact answers, which would make every guess right.
    """
    epsilon = 1.0
    trials, correct = 0, 0
    for world, has_code in enumerate((True, False) * 4):
        root = tmp_path / f"world{world}"
        make_dp_lake(root / "lake", target_has_code=has_code)
        client, settings = _app(root, "adversary", count_rounding=1, epsilon=epsilon, epsilon_per_query=0.1,
                                project_epsilon=None)
        headers = {"Authorization": f"Bearer {TokenStore(settings.token_store).issue(PROJECT, MEMBER)[0]}"}
        differences, refused = _adversary(client, headers, rounds=50)
        assert len(differences) == 5 and refused and "privacy budget" in refused  # 10 queries of 0.1
        guess_has_code = sum(differences) / len(differences) < 1.0
        trials += 1
        correct += guess_has_code == has_code
    # ε-DP bounds any test's success at e^ε / (1 + e^ε) (0.73 for ε = 1); exact answers would give 8 of 8.
    bound = math.exp(epsilon) / (1 + math.exp(epsilon))
    assert correct / trials <= bound + 0.27


def test_reconstruction_of_the_targets_lab_value_is_stopped_by_noise_and_budget(tmp_path):
    make_dp_lake(tmp_path / "lake")
    client, settings = _app(tmp_path, "reconstruct", epsilon=0.5, epsilon_per_query=0.1, project_epsilon=None)
    headers = {"Authorization": f"Bearer {TokenStore(settings.token_store).issue(PROJECT, MEMBER)[0]}"}
    sql = ("SELECT sum(value_as_number) AS s FROM lab_result JOIN patient USING (person_id) "
           "WHERE year_of_birth = 1950")
    estimates, statuses = [], []
    for _ in range(8):
        response = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=headers)
        statuses.append(response.status_code)
        if response.status_code == 200:
            estimates.append(response.json()["rows"][0][0])
    assert statuses == [200] * 5 + [400] * 3
    # One person's cell: its noisy count is almost always under 11, so the sum is suppressed; when not, it is noise.
    assert all(e is None or abs(e - 2 * TARGET_LAB) > 1.0 for e in estimates)


def test_budget_is_spent_refused_at_exhaustion_survives_a_restart_and_is_audited(tmp_path):
    lake = make_dp_lake(tmp_path / "lake")
    client, settings = _app(tmp_path, "budget", epsilon=0.3, epsilon_per_query=0.1, project_epsilon=None)
    headers = {"Authorization": f"Bearer {TokenStore(settings.token_store).issue(PROJECT, MEMBER)[0]}"}
    sql = "SELECT gender_source_value, count(*) AS n FROM patient GROUP BY 1"
    lefts = []
    for _ in range(3):
        response = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=headers)
        assert response.status_code == 200, response.text
        lefts.append(response.json()["privacy"]["budget_left"]["epsilon"])
    assert lefts == pytest.approx([0.2, 0.1, 0.0])
    refused = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=headers)
    assert refused.status_code == 400 and "epsilon 0 and delta" in refused.json()["message"]
    # A new gateway process on the same lake reads the same ledger.
    restarted, _ = _app(tmp_path, "budget-restarted", epsilon=0.3, epsilon_per_query=0.1, project_epsilon=None)
    again = restarted.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=headers)
    assert again.status_code == 400 and "privacy budget" in again.json()["message"]
    rows = read_audit(lake).to_pylist()
    assert [r["outcome"] for r in rows] == ["requested", "allowed"] * 3 + ["requested", "refused"] * 2
    assert all("epsilon 0.1" in r["reason"] for r in rows if r["outcome"] == "requested")
    assert all("epsilon 0.1" in r["reason"] for r in rows if r["outcome"] == "allowed")
    assert not verify_ledger(lake)


def test_anchor_detects_truncation_and_a_rewritten_chain(tmp_path, monkeypatch):
    import shutil

    import pyarrow as pa
    from deltalake import write_deltalake

    from jobs.research.gateway.audit import ENV_ANCHOR_KEY, anchor, anchors_path, row_hash, verify, write_audit
    from jobs.core.lake import Lake

    monkeypatch.setenv(ENV_ANCHOR_KEY, "steward-anchor-key")
    lake = Lake(str(tmp_path / "lake"))
    event = {"user": MEMBER, "project_id": PROJECT, "action": "query", "engine": "duckdb", "outcome": "allowed",
             "policy_version": "v1"}
    for n in range(4):
        write_audit(lake, event | {"sql": f"SELECT {n}"})
    head = anchor(lake)
    assert head["seq"] == 3 and head["signature"] and verify(lake).ok
    audit = lake.ops("access_audit")
    rows = read_audit(lake).to_pylist()

    # Truncation: the newest commits removed from the log (no Delta history left to show it).
    for version in (2, 3):
        (tmp_path / "lake" / "ops" / "access_audit" / "_delta_log" / f"{version:020d}.json").unlink()
    problems = verify(lake).problems
    assert any("truncated" in p for p in problems)

    # Rewriting: the table replaced by an altered chain whose hashes are all recomputed.
    shutil.rmtree(audit)
    forged, previous = [dict(r) for r in rows], "0" * 64
    forged[1]["sql"] = "SELECT 'innocent'"
    for row in forged:
        row["prev_hash"] = previous
        row["row_hash"] = previous = row_hash(row)
    write_deltalake(audit, pa.Table.from_pylist(forged, schema=read_audit(Lake(str(tmp_path / "none"))).schema))
    result = verify(lake)
    assert not result.ok and any("rewritten up to the anchor" in p for p in result.problems)

    # The anchor itself edited to match: its signature no longer does.
    text = anchors_path(lake).read_text().replace(head["row_hash"], forged[3]["row_hash"])
    anchors_path(lake).write_text(text)
    assert any("signature does not match" in p for p in verify(lake).problems)


def test_policy_refuses_identifiers_and_unknown_columns_as_keys(tmp_path):
    from jobs.core.config import load_consortium
    from jobs.privacy.policy import policy_problems

    config = make_dp_config(CONFIG_DIR, tmp_path / "config", public_keys={"person_id": ["p00"]},
                            partition_selection=["no_such_column"])
    problems = [p for p in policy_problems(load_consortium(config)) if p.key.startswith("privacy.")]
    assert {p.key for p in problems} == {"privacy.public_keys", "privacy.partition_selection"}
    assert any("identifier" in p.reason for p in problems)


def test_project_budget_is_shared_by_members_and_the_ledger_is_tamper_evident(tmp_path, capsys):
    from jobs.app.cli import main
    from jobs.privacy.privacy_budget import ledger_path

    lake = make_dp_lake(tmp_path / "lake")
    client, settings = _app(tmp_path, "project", epsilon=1.0, epsilon_per_query=0.1, project_epsilon=0.2)
    store = TokenStore(settings.token_store)
    sql = "SELECT count(*) AS n FROM patient"
    for user, status in (("alice.tremblay", 200), ("bob.gagnon", 200), ("bob.gagnon", 400)):
        headers = {"Authorization": f"Bearer {store.issue(PROJECT, user)[0]}"}
        response = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": sql}, headers=headers)
        assert response.status_code == status, response.text
    assert "project's privacy budget" in response.json()["message"]
    assert main(["audit", "verify", "--lake", lake.root]) == 0
    path = ledger_path(lake)
    path.write_text(path.read_text().replace('"epsilon": 0.1', '"epsilon": 0.0', 1))  # refund oneself
    assert main(["audit", "verify", "--lake", lake.root]) == 1
    assert "privacy ledger line 1" in capsys.readouterr().err
