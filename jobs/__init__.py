"""Affluent: the shared data lake of affiliated health establishments.

All Spark logic lives in this package; Airflow DAGs under ``dags/`` only wire
its entry points together.
"""

__version__ = "0.1.0"
