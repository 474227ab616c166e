"""Airflow's local settings for Affluent: the scheduler preloads what every task imports (jobs.app.airflow_preload).

Airflow imports this module in each of its processes when this folder is on
its ``PYTHONPATH``; only the scheduler does anything. Nothing else is set
here: ``__all__`` is empty, so no name reaches ``airflow.settings``.
"""

from jobs.app.airflow_preload import preload

__all__: list[str] = []

preload()
