"""One INFO line per dataset for each stage of a batch: what an on-call engineer reads first in a task log.

Each stage returns a small summary (see :mod:`jobs.stages.pipeline`); this module
turns it into lines such as::

    validate chu_laurentides/20260105-001 lab_result: read 1200, valid 1180, quarantined 20 (lab.value_plausible 12, lab.loinc_code 8)

so that a task's log says what the stage did, between Airflow's start and
"Done" lines, without opening the batch log.
"""

from __future__ import annotations

import logging

LOGGER = logging.getLogger("affluent.stage")


def _rules(by_rule: dict[str, int] | None) -> str:
    if not by_rule:
        return ""
    return " (" + ", ".join(f"{rule} {n}" for rule, n in sorted(by_rule.items(), key=lambda kv: (-kv[1], kv[0]))) + ")"


def figure_lines(stage: str, establishment_id: str, batch_id: str, summary: dict) -> list[str]:
    """The lines to log for ``summary`` (the dict a stage returned)."""
    where = f"{stage} {establishment_id}/{batch_id}"
    if summary.get("skipped"):
        return [f"{where}: skipped ({summary.get('reason') or 'already done'})"]
    lines: list[str] = []
    if "datasets" in summary:  # validate
        for dataset, figures in sorted(summary["datasets"].items()):
            lines.append(f"{where} {dataset}: read {figures.get('rows', 0)}, valid {figures.get('valid', 0)}, "
                         f"quarantined {figures.get('quarantined', 0)}{_rules(figures.get('by_rule'))}")
        if summary.get("report"):
            lines.append(f"{where}: validation report {summary['report']}")
        return lines
    # Per-dataset counters are the outcome's dict fields (bronze, staged, landed, quarantined, ...), in field order.
    counters = [(name, values) for name, values in summary.items()
                if isinstance(values, dict) and all(isinstance(v, int) for v in values.values())]
    datasets = sorted({d for _, values in counters for d in values})
    for dataset in datasets:
        figures = ", ".join(f"{name} {values.get(dataset, 0)}" for name, values in counters)
        lines.append(f"{where} {dataset}: {figures}")
    return lines or [f"{where}: nothing to do"]


def log_figures(stage: str, establishment_id: str, batch_id: str, summary: dict) -> None:
    for line in figure_lines(stage, establishment_id, batch_id, summary):
        LOGGER.info("%s", line)
