"""The distributed deployment's compose file, checked without a container engine."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA = Path(__file__).with_name("compose-spec.json")
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|FERNET|PSEUDONYM_KEY|ACCESS_KEY)", re.IGNORECASE)
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")
REQUIRED_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")
AIRFLOW_SERVICES = {"airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def test_compose_file_follows_the_compose_specification(compose):
    from jsonschema import Draft201909Validator

    schema = json.loads(SCHEMA.read_text())
    errors = sorted(Draft201909Validator(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_schema_rejects_what_compose_rejects():
    from jsonschema import Draft201909Validator

    validator = Draft201909Validator(json.loads(SCHEMA.read_text()))
    assert not validator.is_valid({"services": {"x": {"image": "a", "healthcheck": {"every": "5s"}}}})
    assert not validator.is_valid({"services": {"x": {"image": "a", "depends_on": {"y": {"condition": "up"}}}}})


def test_the_deployment_has_every_service_of_the_design(services):
    expected = AIRFLOW_SERVICES | {"postgres", "airflow-init", "spark-master", "spark-worker", "minio",
                                   "minio-init"}
    assert expected <= set(services)
    assert services["spark-worker"]["deploy"]["replicas"] >= 2


@pytest.mark.parametrize("name", sorted(yaml.safe_load(COMPOSE_FILE.read_text())["services"]))
def test_every_service_has_a_health_check(services, name):
    check = services[name].get("healthcheck")
    assert check and not check.get("disable"), f"{name} has no health check"
    assert check["test"] and check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: {check['test']!r}"


def test_services_wait_for_the_health_of_what_they_need(services):
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["spark-master"]["condition"] == "service_healthy"
        assert depends["airflow-init"]["condition"] == "service_completed_successfully"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_airflow_reaches_the_cluster_and_the_bucket(services):
    for name in AIRFLOW_SERVICES:
        env = _environment(services[name])
        assert env["AIRFLOW_CONN_SPARK_DEFAULT"] == "spark://spark-master:7077"
        assert env["AFFLUENT_LAKE_ROOT"] == "s3a://affluent-lake/lake"
    assert "mc mb --ignore-existing lake/affluent-lake" in services["minio-init"]["command"][0]
    assert services["spark-master"]["command"][-1] == "master"
    assert services["spark-worker"]["command"][-1] == "spark://spark-master:7077"


def test_the_spark_connection_resolves_to_the_cluster_master(services, monkeypatch):
    from jobs.stages.pipeline import spark_master_from_connection

    uri = _environment(services["airflow-scheduler"])["AIRFLOW_CONN_SPARK_DEFAULT"]
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", uri)
    assert spark_master_from_connection("spark_default") == "spark://spark-master:7077"


def test_secrets_come_only_from_the_env_file(services):
    for name, service in services.items():
        for variable, value in _environment(service).items():
            if SECRET_NAME.search(variable) and not variable.endswith("_FILE"):
                assert REQUIRED_VARIABLE.fullmatch(value), \
                    f"{name}.{variable} must be ${{VAR:?...}} from .env, not {value!r}"
            for password in re.findall(r"://[^:/@]+:([^@]+)@", value):
                assert REQUIRED_VARIABLE.fullmatch(password), f"{name}.{variable} embeds a literal password"
    assert "AFFLUENT_PSEUDONYM_KEY" not in (ROOT / "docker" / "Dockerfile").read_text()
    spark_defaults = (ROOT / "docker" / "spark-conf" / "spark-defaults.conf").read_text()
    assert not re.search(r"^spark\.hadoop\.fs\.s3a\.(access|secret)\.key", spark_defaults, re.MULTILINE)


def test_only_the_scheduler_and_the_spark_service_hold_the_pseudonymisation_key(services):
    holders = {name for name, service in services.items() if "AFFLUENT_PSEUDONYM_KEY" in _environment(service)}
    assert holders == {"airflow-scheduler", "spark-connect"}


def test_env_example_declares_every_required_variable_and_no_real_secret():
    required = set(REQUIRED_VARIABLE.findall(COMPOSE_FILE.read_text()))
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    assert required <= set(example), f"missing in .env.example: {sorted(required - set(example))}"
    for variable, value in example.items():
        if SECRET_NAME.search(variable) and not variable.endswith("ACCESS_KEY"):
            assert value == "", f"{variable} in .env.example must be left empty for the operator to fill"


def test_the_env_file_is_not_committed():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored


def test_spark_in_the_image_is_the_locked_spark():
    """Driver and executors run the project image, so Spark is the version uv.lock pins."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"]}
    import pyspark

    assert pyspark.__version__ == locked["pyspark"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "uv sync --frozen" in dockerfile
    assert "spark-class" in (ROOT / "docker" / "spark-node.sh").read_text()


def test_every_airflow_container_shares_the_lake_writer_lock(services):
    """Erasure and VACUUM wait for writes in every container: the lock folder is on a volume they all mount."""
    from jobs.core.writer_lock import ENV_LOCK_DIR

    for name in AIRFLOW_SERVICES:
        folder = _environment(services[name])[ENV_LOCK_DIR]
        mounts = [v.split(":")[:2] for v in services[name].get("volumes", []) if isinstance(v, str)]
        assert any(folder.startswith(target + "/") and source == "airflow-home" for source, target in mounts), name
