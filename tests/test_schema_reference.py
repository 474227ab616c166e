"""The generated schema and rules reference: up to date with the code, every rule described with its fix."""

from __future__ import annotations

import re
from pathlib import Path

from jobs.app import schema_reference
from jobs.core.schemas import BRONZE_COLUMNS, DATASETS, SILVER_SCHEMAS

JOBS = Path(schema_reference.__file__).resolve().parent
RULE_NAME = re.compile(r"[\"'`]((?:ingest|completeness|conformance|plausibility|integrity|batch)\.[a-z_]+)[\"'`]")


def test_the_committed_reference_is_what_the_code_generates():
    assert schema_reference.is_current(), ("docs/schema-reference.md is out of date: run "
                                           "`affluent schema reference` and commit the page")


def test_every_dataset_and_column_is_in_the_reference():
    page = schema_reference.render_reference()
    for dataset in DATASETS:
        assert f"### `{dataset}`" in page
        for f in SILVER_SCHEMAS[dataset].fields:
            assert f"| `{f.name}` | {f.dataType.simpleString()} |" in page, (dataset, f.name)


def test_source_formats_name_real_source_columns():
    assert all(column in BRONZE_COLUMNS[dataset] for dataset, column in schema_reference.SOURCE_FORMATS)
    # Every date or time a source carries says which profile setting parses it.
    dated = {(d, c) for d in DATASETS for c in BRONZE_COLUMNS[d]
             if re.search(r"date|_at$|visit_start|visit_end|valid_", c)}
    assert dated <= set(schema_reference.SOURCE_FORMATS)


def test_every_rule_the_code_or_a_suite_can_write_is_described_with_its_fix():
    in_code = {m for path in JOBS.rglob("*.py") for m in RULE_NAME.findall(path.read_text(encoding="utf-8"))}
    in_suites = set(schema_reference._suite_rules())
    assert in_code and in_suites
    missing = (in_code | in_suites) - set(schema_reference.RULE_FIXES)
    assert not missing, f"rules without a description and fix in jobs/app/schema_reference.py: {sorted(missing)}"
    assert all(meaning and fix for meaning, fix in schema_reference.RULE_FIXES.values())
    page = schema_reference.render_reference()
    assert "| `plausibility.future_date` | row |" in page and "free-text-component rule" in page
