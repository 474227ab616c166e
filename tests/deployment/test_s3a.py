"""The lake on an S3-compatible server through ``s3a://``.

s3proxy (from Maven Central, cached in ``.cache/maven``) serves a bucket from a
temporary folder on 127.0.0.1 and accepts only requests signed with the test
key. The Spark application uses the project's session factory (which adds
``hadoop-aws`` for ``s3a://`` lake roots), the deployment's
``docker/spark-conf/spark-defaults.conf`` with only the endpoint changed, and
the credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, as the
compose services receive them.
"""

from __future__ import annotations

import pytest

from tests.deployment.conftest import run_spark_app
from tests.deployment.workloads import DENIED_BUCKET_ENV, delta_checks_then_a_wrong_secret

BUCKET = "affluent-lake-test"
DENIED_BUCKET = "affluent-lake-denied"


def test_hadoop_aws_matches_the_hadoop_bundled_with_pyspark():
    from tests.deployment.cluster import bundled_hadoop_version
    from jobs.core.session import S3A_PACKAGES

    # S3A and hadoop-common must be the very same Hadoop release.
    assert S3A_PACKAGES == [f"org.apache.hadoop:hadoop-aws:{bundled_hadoop_version()}"]


@pytest.fixture(scope="module")
def s3a_run(s3_server, tmp_path_factory) -> dict:
    """One application on the S3 server: Delta write, read and MERGE, then a write signed with a wrong secret."""
    s3_server.create_bucket(BUCKET)
    s3_server.create_bucket(DENIED_BUCKET)
    lake_root = f"s3a://{BUCKET}/lake"
    print(f"bucket used: {BUCKET} at {s3_server.endpoint}; lake root {lake_root}")
    work_dir = tmp_path_factory.mktemp("s3a-app")
    result = run_spark_app(
        delta_checks_then_a_wrong_secret, connection_uri="spark://local%5B2%5D", lake_root=lake_root,
        work_dir=work_dir, s3_endpoint=s3_server.endpoint,
        extra_env={"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                   DENIED_BUCKET_ENV: DENIED_BUCKET})
    return {"lake_root": lake_root, "server": s3_server, **result}


@pytest.mark.integration
def test_delta_write_read_merge_on_s3a(s3a_run):
    lake_root, s3_server, result = s3a_run["lake_root"], s3a_run["server"], s3a_run["delta"]
    assert result["table"] == f"{lake_root}/silver/deployment_check"
    assert result["rows_written"] == 10
    assert result["rows_after_merge"] == {"first": 5, "merged": 10}
    assert result["history"] == ["WRITE", "MERGE"]
    # The objects are in the server's bucket, not on a local path named like it.
    delta_log = s3_server.data_dir / BUCKET / "lake" / "silver" / "deployment_check" / "_delta_log"
    assert sorted(p.name for p in delta_log.glob("*.json")) == ["00000000000000000000.json",
                                                                "00000000000000000001.json"]


@pytest.mark.integration
def test_s3_server_rejects_a_wrong_secret(s3a_run):
    denied = s3a_run["denied"]
    assert denied is not None, "a write signed with a wrong secret was accepted"
    assert "AccessDeniedException" in denied and "Status Code: 403" in denied
    assert not (s3a_run["server"].data_dir / DENIED_BUCKET / "denied").exists()
