"""Figure lines of each stage: one per dataset, the rules by count, the report's path."""

from __future__ import annotations

import logging

from jobs.core.stage_log import figure_lines, log_figures


def test_land_gives_one_line_per_dataset_with_every_counter():
    lines = figure_lines("land", "chu", "20260105-001", {
        "landed": {"patient": 3, "encounter": 5}, "quarantined": {"patient": 1}, "duplicates": {"encounter": 2}})
    assert lines == [
        "land chu/20260105-001 encounter: landed 5, quarantined 0, duplicates 2",
        "land chu/20260105-001 patient: landed 3, quarantined 1, duplicates 0",
    ]


def test_validate_names_rules_by_count_and_the_report():
    lines = figure_lines("validate", "chu", "b1", {
        "datasets": {"lab_result": {"rows": 10, "valid": 7, "quarantined": 3,
                                    "by_rule": {"lab.unit": 1, "lab.value_plausible": 2}}},
        "report": "/lake/ops/reports/chu/b1.html"})
    assert lines == ["validate chu/b1 lab_result: read 10, valid 7, quarantined 3 (lab.value_plausible 2, lab.unit 1)",
                     "validate chu/b1: validation report /lake/ops/reports/chu/b1.html"]


def test_a_skipped_stage_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="affluent.stage"):
        log_figures("land", "chu", "b1", {"skipped": True, "reason": "batch already landed"})
    assert [r.getMessage() for r in caplog.records] == ["land chu/b1: skipped (batch already landed)"]
    assert all(r.levelno == logging.INFO for r in caplog.records)
