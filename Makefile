# Quick start: `make demo` runs the lake end to end; `make test` runs the tests.
# Both set up the machine first (scripts/bootstrap: virtualenv, pinned dependencies, cached jars).

.PHONY: setup demo lint test test-fast test-airflow test-bench airflow airflow-stop spark-start spark-stop spark-status bench clean

setup:
	./scripts/bootstrap

demo: setup
	.venv/bin/affluent demo

# Static checks of the pipeline code and the DAGs (settings in pyproject.toml): seconds, no Spark.
lint: setup
	.venv/bin/ruff check jobs dags
	.venv/bin/mypy jobs dags

test: setup
	@start=$$(date +%s); status=0; .venv/bin/python -m pytest --durations=15 || status=$$?; \
	end=$$(date +%s); echo "make test: wall time $$(( (end - start) / 60 )) min $$(( (end - start) % 60 )) s"; exit $$status

test-fast: setup
	.venv/bin/python -m pytest -m "not integration and not airflow_standalone and not benchmark"

# The benchmark script end to end at its smoke size.
test-bench: setup
	.venv/bin/python -m pytest -m benchmark tests/test_benchmarks.py

# Airflow as a data engineer runs it (standalone, REST API, task logs, clean stop): several minutes.
test-airflow: setup
	.venv/bin/python -m pytest -m airflow_standalone tests/integration/test_airflow_standalone.py

airflow: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/affluent airflow

airflow-stop:
	.venv/bin/affluent airflow --stop

# The Spark service (Spark Connect, loopback, token): see README "One warm Spark".
spark-start: setup
	.venv/bin/affluent spark start

spark-stop:
	.venv/bin/affluent spark stop

spark-status:
	.venv/bin/affluent spark status

bench: setup
	.venv/bin/python -m benchmarks.run --size small

clean:
	rm -rf demo lake .pytest_cache
