"""Airflow's scheduler preloads what every task imports; no other Airflow process does (jobs.app.airflow_preload).

Each check runs in a fresh interpreter: the suite's own process has imported
everything already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jobs.app.airflow_preload import MODULES, SETTINGS_DIR

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("great_expectations", "pyspark.sql.connect.session", "jobs.stages.validate")

# Airflow imported as the named command would import it, then what that process holds.
AS_AIRFLOW = """
import json, sys, threading
sys.argv = ["airflow", *sys.argv[1:]]
import airflow  # settings.initialize() imports airflow_local_settings
from jobs.terminology import units
print(json.dumps({"modules": [m for m in %r if m in sys.modules], "threads": threading.active_count(),
                  "registry_built": units._registry.cache_info().currsize == 1}))
"""


def _as_airflow(command: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", AS_AIRFLOW % (HEAVY,), *command], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _airflow_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    from jobs.app.demo import airflow_env

    env = airflow_env(tmp_path)
    env.pop("AFFLUENT_AIRFLOW_PRELOAD", None)
    return env | extra


def test_the_scheduler_affluent_airflow_starts_preloads_what_tasks_import(tmp_path):
    env = _airflow_env(tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(SETTINGS_DIR)
    held = _as_airflow(["scheduler"], env)
    assert held["modules"] == list(HEAVY)
    assert held["registry_built"] is True
    # A fork copies no thread: preloading must start none in the process the executor forks from.
    assert held["threads"] == 1


def test_other_airflow_processes_start_as_before(tmp_path):
    env = _airflow_env(tmp_path)
    for command in (["api-server"], ["dag-processor"], ["tasks", "test"], ["dags", "trigger"]):
        held = _as_airflow(command, env)
        assert held["modules"] == [] and held["registry_built"] is False, command


def test_preloading_can_be_turned_off(tmp_path):
    held = _as_airflow(["scheduler"], _airflow_env(tmp_path, AFFLUENT_AIRFLOW_PRELOAD="off"))
    assert held["modules"] == [] and held["registry_built"] is False


def test_a_module_that_fails_to_import_is_left_to_the_task(monkeypatch, caplog):
    from jobs.app import airflow_preload

    monkeypatch.setattr(airflow_preload, "MODULES", ("jobs.no_such_module", *MODULES[:1]))
    loaded = airflow_preload.preload(["airflow", "scheduler"])
    assert loaded == [MODULES[0], "jobs.terminology.units"]
    assert "not preloading jobs.no_such_module" in caplog.text


def test_the_distributed_scheduler_gets_the_same_settings():
    import yaml

    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    scheduler = compose["services"]["airflow-scheduler"]
    assert scheduler["environment"]["PYTHONPATH"] == "/opt/affluent/" + str(SETTINGS_DIR.relative_to(PROJECT_ROOT))
    assert (SETTINGS_DIR / "airflow_local_settings.py").is_file()
