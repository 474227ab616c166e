"""Extracts written by Spark: read by the gateway as they are, refused when they carry deletion vectors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from jobs.research.gateway.server import GatewaySettings
from jobs.research.gateway.tokens import TokenStore
from tests.conftest import CONFIG_DIR
from tests.gateway_helpers import MEMBER, PROJECT, make_config

ROWS = [(f"p{i:02d}", "female" if i % 2 else "male", 1950 + i, "H2X") for i in range(15)]
SCHEMA = "person_id string, gender_source_value string, year_of_birth int, postal_prefix string"


@pytest.fixture(scope="module")
def gateway(spark, tmp_path_factory):
    from jobs.research.gateway.app import create_app
    from jobs.core.lake import Lake

    root = tmp_path_factory.mktemp("gateway-dv")
    lake = Lake(str(root / "lake"))
    # The patient extract as publish writes it (plain overwrite, no deletion vectors) ...
    spark.createDataFrame(ROWS, SCHEMA).write.format("delta").save(lake.project(PROJECT, "patient"))
    # ... and an encounter extract whose table has deletion vectors and a DELETE that used them.
    encounter = lake.project(PROJECT, "encounter")
    spark.createDataFrame([(f"v{i}", f"p{i:02d}") for i in range(15)], "visit_occurrence_id string, person_id string") \
        .write.format("delta").option("delta.enableDeletionVectors", "true").save(encounter)
    spark.sql(f"DELETE FROM delta.`{encounter}` WHERE person_id = 'p03'")
    settings = GatewaySettings.from_env(lake_root=lake.root, config_dir=make_config(CONFIG_DIR, root / "config"),
                                        token_store=root / "tokens.jsonl")
    token, _ = TokenStore(settings.token_store).issue(PROJECT, MEMBER)
    return TestClient(create_app(settings)), {"Authorization": f"Bearer {token}"}


def test_spark_written_extract_is_served(gateway):
    client, headers = gateway
    response = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": "SELECT person_id FROM patient"},
                           headers=headers)
    assert response.status_code == 200 and len(response.json()["rows"]) == 15


def test_extract_with_deletion_vectors_is_refused_not_misread(gateway):
    client, headers = gateway
    response = client.post(f"/v1/projects/{PROJECT}/query", json={"sql": "SELECT person_id FROM encounter"},
                           headers=headers)
    assert response.status_code == 400 and "deletion vectors" in response.json()["message"]
    shared = client.post(f"/delta-sharing/shares/{PROJECT}/schemas/extracts/tables/encounter/query", json={},
                         headers=headers)
    assert shared.status_code == 400 and "deletion vectors" in shared.json()["message"]
    assert "p03" not in shared.text
