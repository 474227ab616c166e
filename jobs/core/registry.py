"""Light-weight look-ups for DAG files: what establishments and datasets exist.

DAG files are parsed constantly by the scheduler, so this module imports
neither Spark nor pydantic; it reads only ids from ``config/``. The full
validation happens in the tasks (``jobs.core.config``), which refuse to run on a
broken configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

CANONICAL_DATASETS = ("patient", "encounter", "diagnosis", "lab_result", "medication", "consent", "observation")

# One slot: the tasks that write silver, quarantine, gold and project extracts (land, publish,
# maintenance with erasure) run one at a time, so VACUUM, erasure's DELETE and a MERGE never overlap.
# Created by `affluent demo` / `affluent airflow` (jobs.app.demo.ensure_writers_pool) and by compose's airflow-init.
LAKE_WRITERS_POOL = "affluent_lake_writers"
LAKE_WRITERS_POOL_SLOTS = 1
LAKE_WRITERS_POOL_DESCRIPTION = "One lake-writing task at a time: land, publish, maintenance and erasure"


# Retries of every task: a task that finds the Spark service down (restarting, or stopped for an upgrade)
# fails naming its address and succeeds on a retry once the service is back, so retries come soon and
# a few times. Errors no retry can fix (a rejected batch, a missing key) fail at once whatever this says.
ENV_TASK_RETRIES = "AFFLUENT_TASK_RETRIES"
ENV_TASK_RETRY_DELAY = "AFFLUENT_TASK_RETRY_DELAY_SECONDS"
DEFAULT_TASK_RETRIES = 3
DEFAULT_TASK_RETRY_DELAY_S = 30


def retry_args() -> dict:
    """``retries`` and ``retry_delay`` for a DAG's ``default_args``, from the environment (read at parse time)."""
    from datetime import timedelta

    values = {}
    for name, default in ((ENV_TASK_RETRIES, DEFAULT_TASK_RETRIES), (ENV_TASK_RETRY_DELAY, DEFAULT_TASK_RETRY_DELAY_S)):
        raw = os.environ.get(name, "").strip()
        if raw and not raw.isdigit():
            raise ValueError(f"{name}={raw!r}: a whole number is expected")
        values[name] = int(raw) if raw else default
    return {"retries": values[ENV_TASK_RETRIES], "retry_delay": timedelta(seconds=values[ENV_TASK_RETRY_DELAY])}


@dataclass(frozen=True)
class EstablishmentEntry:
    id: str
    name: str
    format: str


def config_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / "config"
    return Path(os.environ.get("AFFLUENT_CONFIG_DIR", default))


def establishments() -> list[EstablishmentEntry]:
    """Establishments declared under ``config/establishments/``, one per file."""
    entries = []
    for path in sorted((config_dir() / "establishments").glob("*.yaml")):
        with path.open(encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        entries.append(EstablishmentEntry(str(data.get("id", path.stem)), str(data.get("name", path.stem)),
                                          str((data.get("input") or {}).get("format", "?"))))
    return entries


def silver_asset_name(dataset: str) -> str:
    return f"affluent.silver.{dataset}"


def silver_asset_uri(dataset: str) -> str:
    return f"affluent://silver/{dataset}"


def silver_assets() -> list:
    """The Airflow Assets of the silver tables: land's outlets, publish's schedule. Defined here only."""
    from airflow.sdk import Asset

    return [Asset(name=silver_asset_name(d), uri=silver_asset_uri(d)) for d in CANONICAL_DATASETS]


def task_context():
    """The pipeline context of an Airflow task: a client of the Spark service, else Spark from ``spark_default``.

    The service's connection (``affluent_spark``) wins: the task then starts no
    Spark and ``spark_default`` is not consulted. Called inside tasks only,
    never at parse time (the connection look-ups need a running task).
    """
    from jobs.core.session import remote_url
    from jobs.stages.pipeline import Context, spark_master_from_connection

    if remote_url():
        return Context.from_env()
    return Context.from_env(spark_master=spark_master_from_connection("spark_default"))
