"""What every Affluent task imports, imported once in Airflow's scheduler so that its task processes start with it.

The LocalExecutor forks its workers from the scheduler process, and each
worker forks one process per task: a module the scheduler has imported is
already loaded in every task process. Without this, each task imports Spark's
Connect client and the pipeline's modules (about 1 s on two cores), the
validate task Great Expectations (about 4 s), and each builds the UCUM unit
registry that checks ``units.yaml`` when the configuration loads (about
1.4 s): seconds of every task that do not depend on the batch.

Airflow imports ``airflow_local_settings`` in each of its processes; the one
in ``jobs/app/airflow_settings/`` (on the ``PYTHONPATH`` that ``affluent
airflow``, the demo and ``docker-compose.yml`` give Airflow) calls
:func:`preload`, which only acts in the scheduler (``airflow scheduler``):
the API server, the DAG processor, the triggerer and every CLI command start
as before. Nothing it does starts a thread, opens a connection or reads the
key (a fork copies none of those safely); a module that fails to import is
logged and left to the task, which then reports its own error.
``AFFLUENT_AIRFLOW_PRELOAD=off`` turns it off.

Example::

    preload(["airflow", "scheduler"])   # -> the modules loaded, in order
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

ENV_PRELOAD = "AFFLUENT_AIRFLOW_PRELOAD"
# The folder holding the airflow_local_settings module that calls preload (goes on Airflow's PYTHONPATH).
SETTINGS_DIR = Path(__file__).resolve().parent / "airflow_settings"
# What the stage tasks import, heaviest last; each an import and nothing more.
MODULES = (
    "pyspark.sql.connect.session",
    "jobs.stages.pipeline",
    "jobs.stages.ingest",
    "jobs.stages.pseudonymise",
    "jobs.stages.validate",
    "jobs.stages.land",
    "great_expectations",
)


def wanted(argv: Sequence[str]) -> bool:
    """Whether this process is Airflow's scheduler (whose executor forks the task processes), preload not turned off."""
    if os.environ.get(ENV_PRELOAD, "on").strip().lower() in ("off", "0", "false", "no"):
        return False
    return len(argv) > 1 and argv[1] == "scheduler"


def preload(argv: Sequence[str] | None = None) -> list[str]:
    """Import :data:`MODULES` and build the unit registry when this process is the scheduler; what was loaded."""
    if not wanted(sys.argv if argv is None else argv):
        return []
    loaded = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the task imports it again and reports its own error
            log.warning("affluent: not preloading %s in the scheduler (%s: %s)", name, type(exc).__name__, exc)
            continue
        loaded.append(name)
    try:
        _units()
    except Exception as exc:  # noqa: BLE001 - as above: the task checks units.yaml itself
        log.warning("affluent: not preloading the UCUM unit registry (%s: %s)", type(exc).__name__, exc)
    else:
        loaded.append("jobs.terminology.units")
    return loaded


def _units() -> None:
    """The UCUM registry, and the configured units parsed (remembered per unit spelling, whatever the file says later)."""
    from jobs.core.settings import ENV_CONFIG_DIR, PROJECT_ROOT
    from jobs.terminology import units
    from jobs.terminology.maps import TERMINOLOGY_DIR

    units._registry()  # noqa: SLF001 - the module's own once-per-process registry
    folder = Path(os.environ.get(ENV_CONFIG_DIR, PROJECT_ROOT / "config")) / TERMINOLOGY_DIR
    if folder.is_dir():
        units.load_units(folder)
