"""Validation reports: one self-contained HTML page per validation run, and an index.

Reports hold counts only (rows, failures per expectation and rule), never a
value of a row, so they can be read by anyone allowed in the ops zone. They are
written through Hadoop's file system API, so the same code writes to a local
lake or to object storage.

Layout under :meth:`Lake.reports`::

    index.html                                   latest run of every batch
    <establishment>/<batch>/validation-<run>.html
"""

from __future__ import annotations

import datetime as dt
import html
from collections import defaultdict

from pyspark.sql import SparkSession

from jobs.core import files
from jobs.core.lake import Lake
from jobs.core.tables import table_exists

# The index lists this many of the latest runs.
INDEX_RUNS = 500

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1d2433}
h1{font-size:1.4rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}
th,td{border:1px solid #d0d5dd;padding:.3rem .6rem;text-align:left;font-size:.9rem}
th{background:#f2f4f7}.ok{color:#067647}.ko{color:#b42318;font-weight:600}
.muted{color:#667085}.banner{padding:.6rem 1rem;border-radius:6px;margin:1rem 0}
.banner.ok{background:#ecfdf3}.banner.ko{background:#fef3f2}
"""


def report_path(lake: Lake, establishment_id: str, batch_id: str, run_at: dt.datetime) -> str:
    return f"{lake.reports()}/{establishment_id}/{batch_id}/validation-{run_at:%Y%m%dT%H%M%S}.html"


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write a UTF-8 file at ``path`` (local or object storage), replacing it."""
    files.write_text(path, text)


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _verdict(success: bool) -> str:
    return "<span class='ok'>passed</span>" if success else "<span class='ko'>failed</span>"


def render_validation_report(establishment_id: str, batch_id: str, batch_kind: str, run_at: dt.datetime,
                             results: list[tuple], failures: list, outcomes: dict) -> str:
    """The HTML page of one run. ``results`` are rows of ``ops/validation_results``."""
    e = html.escape
    stopped = bool(failures)
    parts = [f"<h1>Validation of {e(establishment_id)} / {e(batch_id)}</h1>",
             f"<p class='muted'>{e(batch_kind)} batch, run at {run_at:%Y-%m-%d %H:%M:%S} UTC</p>"]
    if stopped:
        items = "".join(f"<li>{e(str(f))}</li>" for f in failures)
        parts.append(f"<div class='banner ko'><b>Batch stopped: nothing lands.</b><ul>{items}</ul></div>")
    else:
        parts.append("<div class='banner ok'><b>Batch validated.</b> Valid rows go on to land; "
                     "quarantined rows are in the quarantine table with their rule and reason.</div>")
    summary = [[e(d), str(o.rows), str(o.valid), str(o.quarantined),
                e(", ".join(f"{rule}: {n}" for rule, n in o.by_rule.items())) or "-"]
               for d, o in outcomes.items()]
    parts += ["<h2>Rows</h2>", _table(["dataset", "rows", "valid", "quarantined", "quarantined by rule"], summary)]
    by_dataset: dict[str, list[tuple]] = defaultdict(list)
    for row in results:
        by_dataset[row[2]].append(row)
    for dataset, rows in by_dataset.items():
        lines = [[e(r[3]), e(r[4]), e(r[5]), _verdict(r[6]),
                  "-" if r[7] is None else str(r[7]), "-" if r[8] is None else str(r[8]),
                  e(r[9]) if r[5] == "batch" and r[9] is not None else ""]
                 for r in rows]
        parts += [f"<h2>{e(dataset)}</h2>",
                  _table(["expectation", "rule", "kind", "result", "unexpected", "rows", "observed"], lines)]
    return _page(f"Validation {establishment_id}/{batch_id}", "".join(parts))


def write_index(spark: SparkSession, lake: Lake) -> str:
    """Rewrite ``index.html`` from ``ops/validation_results`` (latest runs first).

    The results are read with delta-rs and summed with Arrow: a refresh after each
    validation needs no Spark job.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from jobs.core.arrow_tables import read_table

    path = f"{lake.reports()}/index.html"
    rows = []
    results_path = lake.ops("validation_results")
    if table_exists(spark, results_path):
        results = read_table(results_path, ["establishment_id", "batch_id", "run_at", "success", "kind",
                                            "unexpected_count"])
        # delta-rs reads strings as string views, which Arrow's grouping and comparisons do not all take.
        text = ("establishment_id", "batch_id", "kind")
        results = pa.table({name: pc.cast(results[name], pa.string()) if name in text else results[name]
                            for name in results.column_names})
        row_failures = pc.if_else(pc.equal(results["kind"], "row"), results["unexpected_count"],
                                  pa.scalar(None, pa.int64()))
        runs = (results.select(["establishment_id", "batch_id", "run_at"])
                .append_column("ok", pc.cast(results["success"], pa.int8()))
                .append_column("failures", pc.cast(row_failures, pa.int64()))
                .group_by(["establishment_id", "batch_id", "run_at"])
                .aggregate([("ok", "min"), ("failures", "sum")])
                .sort_by([("run_at", "descending")])
                .slice(0, INDEX_RUNS))
        rows = runs.to_pylist()
    lines = []
    for r in rows:
        run_at = r["run_at"]
        link = f"{r['establishment_id']}/{r['batch_id']}/validation-{run_at:%Y%m%dT%H%M%S}.html"
        lines.append([html.escape(r["establishment_id"]),
                      f"<a href='{html.escape(link)}'>{html.escape(r['batch_id'])}</a>",
                      f"{run_at:%Y-%m-%d %H:%M:%S}", _verdict(bool(r["ok_min"])), str(r["failures_sum"] or 0)])
    body = ("<h1>Affluent validation reports</h1>"
            + _table(["establishment", "batch", "run (UTC)", "all expectations", "row-level failures"], lines))
    write_text(spark, path, _page("Affluent validation reports", body))
    return path


def write_validation_report(spark: SparkSession, lake: Lake, establishment_id: str, batch_id: str,
                            batch_kind: str, run_at: dt.datetime, results: list[tuple], failures: list,
                            outcomes: dict) -> str:
    """Write the run's page and refresh the index; return the page's path."""
    path = report_path(lake, establishment_id, batch_id, run_at)
    write_text(spark, path, render_validation_report(establishment_id, batch_id, batch_kind, run_at,
                                                     results, failures, outcomes))
    write_index(spark, lake)
    return path
