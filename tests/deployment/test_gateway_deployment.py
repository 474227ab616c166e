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
