"""The researcher gateway in the distributed deployment: its compose service and its S3 policy.

The local S3 test server of this folder (s3proxy) has no IAM: it accepts any
credentials and enforces no policy, so the gateway's MinIO policy cannot be
exercised there. Its statements are evaluated here instead, with the IAM rules
that matter for it (explicit allow, ``*`` wildcards in resources and
``s3:prefix`` conditions, everything else denied).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "docker" / "minio" / "gateway-policy.json"
BUCKET = "affluent-lake"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def allowed(policy: dict, action: str, key: str | None = None, prefix: str | None = None) -> bool:
    """Whether ``policy`` allows ``action`` on an object ``key`` (or a listing of ``prefix``)."""
    resource = f"arn:aws:s3:::{BUCKET}" + (f"/{key}" if key is not None else "")
    for statement in policy["Statement"]:
        if statement["Effect"] != "Allow" or action not in statement["Action"]:
            continue
        if not any(fnmatch.fnmatchcase(resource, pattern) for pattern in statement["Resource"]):
            continue
        condition = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if condition is not None and (prefix is None or not any(fnmatch.fnmatchcase(prefix, c) for c in condition)):
            continue
        return True
    return False


def test_gateway_policy_reads_projects_and_gold_and_appends_to_the_audit_only():
    policy = json.loads(POLICY.read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert actions == {"s3:ListBucket", "s3:GetObject", "s3:PutObject"}  # no Delete, no wildcard, no admin
    assert all(s["Effect"] == "Allow" and "*" not in s["Action"] for s in policy["Statement"])

    extract = "lake/projects/diabetes_outcomes/encounter/part-0.parquet"
    audit = "lake/ops/access_audit/_delta_log/00000000000000000007.json"
    assert allowed(policy, "s3:GetObject", extract)
    assert allowed(policy, "s3:GetObject", "lake/gold/indicators/part-0.parquet")
    assert allowed(policy, "s3:PutObject", audit) and allowed(policy, "s3:GetObject", audit)
    assert allowed(policy, "s3:ListBucket", prefix="lake/projects/diabetes_outcomes/encounter/_delta_log/")
    for zone in ("silver/patient", "bronze/patient", "landing/chu/b1", "staged/patient", "quarantine/rows",
                 "ops/batch_log", "ops/erasure_requests"):
        key = f"lake/{zone}/part-0.parquet"
        assert not allowed(policy, "s3:GetObject", key), key
        assert not allowed(policy, "s3:ListBucket", prefix=f"lake/{zone}/"), zone
    assert not allowed(policy, "s3:ListBucket", prefix="lake/")
    assert not allowed(policy, "s3:PutObject", extract)
    assert not allowed(policy, "s3:DeleteObject", audit)
    assert not allowed(policy, "s3:PutObject", "lake/ops/access_audit_copy/x.json")


def test_gateway_service_holds_no_key_and_uses_its_own_s3_user(services):
    gateway = services["gateway"]
    env = {k: str(v) for k, v in gateway["environment"].items()}
    assert gateway["command"][:2] == ["affluent", "gateway"] and "--unconfined" not in gateway["command"]
    assert not {k for k in env if "PSEUDONYM_KEY" in k or k.startswith("AIRFLOW_CONN_")}
    assert env["AWS_ACCESS_KEY_ID"].startswith("${AFFLUENT_GATEWAY_S3_ACCESS_KEY:?")
    assert env["AWS_SECRET_ACCESS_KEY"].startswith("${AFFLUENT_GATEWAY_S3_SECRET_KEY:?")
    assert env["AFFLUENT_LAKE_ROOT"] == "s3a://affluent-lake/lake"
    assert all(port.startswith("127.0.0.1:") for port in gateway["ports"])
    assert gateway["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert "/v1/health" in " ".join(gateway["healthcheck"]["test"])


def test_minio_init_creates_and_attaches_the_gateway_policy(services):
    init = services["minio-init"]
    assert "./docker/minio/gateway-policy.json:/etc/affluent/gateway-policy.json:ro" in init["volumes"]
    script = init["command"][0]
    assert "mc admin policy create lake affluent-gateway /etc/affluent/gateway-policy.json" in script
    assert 'mc admin policy attach lake affluent-gateway --user "$$AFFLUENT_GATEWAY_S3_ACCESS_KEY"' in script
    # The pipeline's own user is not the gateway's.
    assert "AFFLUENT_GATEWAY" not in str(services["airflow-scheduler"]["environment"])


def test_delta_sharing_serves_an_object_store_lake_through_the_gateway(s3_server, tmp_path, monkeypatch):
    """The gateway on an ``s3a://`` lake (the local S3 server): a Delta Sharing client reads exactly the
    extract, each file passes through the gateway (ranges included) and is audited on the object store,
    and a revoked token's file URL dies."""
    import httpx
    import pyarrow.fs as pafs
    from deltalake import write_deltalake

    import delta_sharing
    from jobs.core.arrow_tables import delta_uri
    from jobs.research.gateway.audit import read_audit
    from jobs.research.gateway.tokens import TokenStore
    from jobs.core.lake import Lake
    from tests.conftest import CONFIG_DIR
    from tests.gateway_helpers import (MEMBER, PROJECT, SILVER_SECRET, clean_env, encounters, free_port,
                                       make_config, start_gateway, wait_healthy)

    s3 = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
          "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
          "AWS_CONDITIONAL_PUT": "etag"}
    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    pafs.S3FileSystem(access_key=s3_server.access_key, secret_key=s3_server.secret_key, region="us-east-1",
                      endpoint_override=s3_server.endpoint, scheme="http", allow_bucket_creation=True
                      ).create_dir("sharing-lake")
    lake = Lake("s3a://sharing-lake/lake")
    write_deltalake(delta_uri(lake.project(PROJECT, "encounter")), encounters())
    write_deltalake(delta_uri(lake.silver("encounter")), encounters().append_column(
        "note", __import__("pyarrow").array([SILVER_SECRET] * 30)))
    config = make_config(CONFIG_DIR, tmp_path / "config")
    tokens = tmp_path / "access" / "tokens.jsonl"
    store = TokenStore(tokens)
    port = free_port()
    process = start_gateway(lake, config, port, env=clean_env(**s3, AFFLUENT_TOKEN_STORE=str(tokens)))
    try:
        wait_healthy(process, port)
        token, record = store.issue(PROJECT, MEMBER)
        profile = tmp_path / "profile.share"
        profile.write_text(json.dumps({"shareCredentialsVersion": 1, "bearerToken": token,
                                       "endpoint": f"http://127.0.0.1:{port}/delta-sharing"}))
        frame = delta_sharing.load_as_pandas(f"{profile}#{PROJECT}.extracts.encounter")
        expected = encounters().to_pandas()
        got = frame.sort_values("visit_occurrence_id").reset_index(drop=True)[list(expected.columns)]
        assert got.astype(str).values.tolist() == expected.astype(str).values.tolist()

        headers = {"Authorization": f"Bearer {token}"}
        lines = httpx.post(f"http://127.0.0.1:{port}/delta-sharing/shares/{PROJECT}/schemas/extracts/tables/"
                           "encounter/query", json={}, headers=headers).text.splitlines()
        file = json.loads(lines[-1])["file"]
        whole = httpx.get(file["url"])
        assert whole.status_code == 200 and whole.content.startswith(b"PAR1") and len(whole.content) == file["size"]
        tail = httpx.get(file["url"], headers={"Range": "bytes=-8"})
        assert tail.status_code == 206 and tail.content == whole.content[-8:]
        assert tail.headers["content-range"] == f"bytes {file['size'] - 8}-{file['size'] - 1}/{file['size']}"
        assert httpx.get(file["url"], headers={"Range": f"bytes={file['size']}-"}).status_code == 416
        store.revoke(record.token_id)
        assert httpx.get(file["url"]).status_code == 403
    finally:
        process.terminate()
        process.wait(timeout=30)

    audit = [r for r in read_audit(lake).to_pylist() if r["token_id"] == record.token_id]
    assert any(r["outcome"] == "allowed" and (r["reason"] or "").startswith("file encounter/") for r in audit)
    assert audit[-1]["outcome"] == "refused" and all(r["user"] == MEMBER for r in audit)
