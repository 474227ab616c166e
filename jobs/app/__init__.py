"""Entry points: the ``affluent`` command line, the demo and the embedded Airflow."""
