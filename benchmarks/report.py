"""Markdown tables and the throughput plot, rebuilt from every ``<size>.json`` in a folder.

The Markdown goes between the ``<!-- results:begin -->`` and
``<!-- results:end -->`` markers of ``docs/benchmarks.md``; the text around
them is left as written.

Example::

    .venv/bin/python -m benchmarks.report            # docs/benchmarks/*.json -> docs/benchmarks.md + PNG
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.core.settings import PROJECT_ROOT  # noqa: E402

SIZE_ORDER = ("small", "100k", "1m")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PLOT = "throughput.png"
# Steps drawn in the plot, in flow order.
PLOTTED = ("bare_copy", "full.ingest", "full.pseudonymise", "full.validate", "full.land", "publish")
# Results written before the bare copy and ratios 4, 5 and 6 were corrected carry no ``method`` (method 1);
# method 2 ran ratio 5's tasks each on a Spark driver of its own, against the stage functions inside them.
METHOD = 3
EARLIER_METHODS = {
    1: "bare copy with JSON schema inference, erasure on silver-only copies, one DAG with dag.test() in the warm "
       "session, queries timed with the recorder's overhead",
    2: "ratio 5's DAG tasks each started a Spark driver of their own, and the ratio compared the DAG with the "
       "stage functions timed inside those tasks",
}


def load_results(folder: Path) -> list[dict]:
    found = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("*.json")}
    return [found[s] for s in SIZE_ORDER if s in found]


def _n(value, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{round(value):,}"


def stage_table(result: dict) -> list[str]:
    lines = [f"#### {result['size']} — {result['parameters']['patients']:,} patients, "
             f"{result['parameters']['batches']} batches"
             + ("" if result.get("complete") else " (partial: the run did not finish)")
             + (" (earlier method)" if earlier(result) else ""), "",
             "| step | rows | seconds | rows/s | peak memory MB (Python + JVM) | Spark jobs | in Spark jobs (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    profile = result.get("profile") or {}
    for name, step in result["stages"].items():
        peak = step["peak_memory"]
        jobs = profile.get(name, {})
        lines.append(f"| {name} | {_n(step['rows'])} | {_n(step['seconds'], 2)} | {_n(step.get('rows_per_second'))} "
                     f"| {_n(peak['total_mb'])} ({_n(peak['python_mb'])} + {_n(peak['jvm_mb'])}) "
                     f"| {_n(jobs.get('spark_jobs'))} | {_n(jobs.get('spark_job_seconds'), 1)} |")
    return lines + [""]


def _ratio(result: dict, name: str, key: str = "ratio"):
    return (result.get("ratios") or {}).get(name, {}).get(key)


RATIOS = (
    ("pipeline_overhead", "ratio", "1. pipeline (4 stages) ÷ bare Spark copy, full batch"),
    ("validation", "ratio", "2a. validate stage ÷ single-pass Spark checks"),
    ("validation", "ratio_gx_over_spark", "2b. GX ÷ single-pass Spark checks (same suites)"),
    ("incremental", "ratio", "3a. incremental batch ÷ full batch, seconds"),
    ("incremental", "rows_share", "3b. incremental batch ÷ full batch, rows"),
    ("erasure", "as_landed.ratio_10n_over_n", "4a. erasure at 10×N ÷ at N, silver as landed"),
    ("erasure", "clustered_by_person.ratio_10n_over_n", "4b. erasure at 10×N ÷ at N, clustered by person_id"),
    ("orchestration", "ratio", "5. DAG run wall time ÷ the same stages in the warm session"),
    ("researcher_query", "ratio", "6. Spark SQL ÷ DuckDB/delta-rs, researcher query"),
)


# What a ratio re-measured on its own (``benchmarks.run --only NAME``) replaced in a size's results.
REMEASURED = {
    "validation": "the validation ratios (2a, 2b) and the `validation_engines.*` steps",
    "erasure": "the erasure ratios (4a, 4b) and the `erasure_setup.*` and `erasure.*` steps",
}


def earlier(result: dict) -> bool:
    return result.get("method", 1) < METHOD


def ratio_table(results: list[dict]) -> list[str]:
    lines = ["| ratio | " + " | ".join(r["size"] + (" (earlier method)" if earlier(r) else "") for r in results)
             + " |",
             "|---|" + "---:|" * len(results)]
    for name, key, label in RATIOS:
        values = []
        for r in results:
            if name == "erasure":
                value = (r.get("ratios") or {}).get("erasure", {}).get(key)
            else:
                value = _ratio(r, name, key)
            values.append("–" if value is None else f"{value:g}")
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    for r in results:
        for name, again in sorted((r.get("remeasured") or {}).items()):
            what = REMEASURED.get(name, f"the {name} ratio")
            lines += ["", f"{r['size']}: {what} were re-measured in a run of their own on {again['at'][:10]} "
                          f"(commit {again['commit']}): {again['why']}. Every other figure of that column is the "
                          "run's."]
    for method, how in sorted(EARLIER_METHODS.items()):
        old = [r["size"] for r in results if r.get("method", 1) == method]
        if old:
            which = "Every column" if len(old) == len(results) else "Column(s) " + ", ".join(old)
            lines += ["", f"{which}: measured with an earlier method ({how}); those ratios do not measure what "
                          "*What each ratio compares* now describes, and are not comparable with the other columns."]
    return lines + [""]


COMMIT_BATCHES = (("full", "full batch, warm session"), ("incremental", "incremental batch, warm session"),
                  ("dag", "incremental batch through its DAG"))


def code_lines(results: list[dict]) -> list[str]:
    """Which commit each size was measured at (results written before it was recorded say so)."""
    lines = []
    for r in results:
        code = r.get("code") or {}
        at = (f"commit `{code['short']}`" + (" with uncommitted changes" if code.get("dirty") else "")
              if code.get("commit") else "an unrecorded commit")
        lines.append(f"- {r['size']}: measured at {at}" + (f", started {r['started_at']}" if r.get("started_at") else ""))
    return lines + [""]


def commits_table(results: list[dict]) -> list[str]:
    """Delta commits per batch: every table of every zone, total (per stage) over the measured establishments."""
    lines = ["| batch | " + " | ".join(r["size"] for r in results) + " |", "|---|" + "---|" * len(results)]
    for key, label in COMMIT_BATCHES:
        cells = []
        for r in results:
            made = (r.get("delta_commits_per_batch") or {}).get(key)
            cells.append("–" if made is None else f"{made['total']:,} over {made['establishments']} establishment(s) ("
                         + ", ".join(f"{s} {n}" for s, n in made["per_stage"].items()) + ")")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(results: list[dict]) -> str:
    lines = ["### Ratios (side by side in one run)", ""] + ratio_table(results)
    lines += ["### Delta commits per batch", ""] + commits_table(results)
    lines += ["### Code measured", ""] + code_lines(results) + ["### Steps per size", ""]
    for result in results:
        lines += stage_table(result)
    return "\n".join(lines)


def write_doc(doc: Path, text: str) -> None:
    current = doc.read_text(encoding="utf-8") if doc.is_file() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in current or END not in current:
        current = current.rstrip("\n") + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")


def plot_throughput(results: list[dict], path: Path) -> None:
    """Grouped bars: rows per second of each step, one bar per size, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.6), dpi=120)
    width = 0.8 / max(1, len(results))
    for i, result in enumerate(results):
        values = [(result["stages"].get(step) or {}).get("rows_per_second") or 0 for step in PLOTTED]
        positions = [x + (i - (len(results) - 1) / 2) * width for x in range(len(PLOTTED))]
        bars = ax.bar(positions, values, width, label=f"{result['size']} ({result['parameters']['patients']:,} patients)")
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(PLOTTED)), [s.removeprefix("full.") for s in PLOTTED])
    ax.set_yscale("log")
    ax.set_ylabel("rows per second (log)")
    ax.set_ylim(top=ax.get_ylim()[1] * 2.5)  # room for the value labels above the tallest bar
    ax.set_title("Throughput per stage, full batch of every establishment (2 shared cores)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(results), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(folder: Path, doc: Path | None, plot: bool) -> None:
    results = load_results(folder)
    if not results:
        return
    if doc is not None:
        write_doc(doc, markdown(results))
    if plot:
        plot_throughput(results, folder / PLOT)


if __name__ == "__main__":
    render(PROJECT_ROOT / "docs" / "benchmarks", PROJECT_ROOT / "docs" / "benchmarks.md", plot=True)
