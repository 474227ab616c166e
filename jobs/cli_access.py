"""``affluent`` commands for researchers, stewards and maintenance."""

from __future__ import annotations

import argparse
import json
import sys


def _ctx():
    from jobs import pipeline

    return pipeline.Context.from_env()


def _cmd_query(args: argparse.Namespace) -> int:
    from jobs.access import query
    from jobs.policy import AccessDenied

    ctx = _ctx()
    spark = ctx.spark if args.engine == "spark" else None
    try:
        result = query(spark, ctx.lake, ctx.consortium, args.project, args.user, args.sql, engine=args.engine)
    except AccessDenied as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    if args.engine == "spark":
        result.show(args.limit, truncate=False)
    else:
        print(result.slice(0, args.limit).to_pandas().to_string(index=False))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from jobs.access import export
    from jobs.policy import AccessDenied

    ctx = _ctx()
    spark = ctx.spark if args.engine == "spark" else None
    try:
        outcome = export(spark, ctx.lake, ctx.consortium, args.project, args.user, args.sql, args.out,
                         fmt=args.format, engine=args.engine)
    except AccessDenied as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    print(outcome)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from jobs import pipeline

    print(json.dumps(pipeline.publish_all(_ctx()), default=str, indent=2))
    return 0


def _cmd_erasure_request(args: argparse.Namespace) -> int:
    from jobs.erasure import request_erasure

    ctx = _ctx()
    request_id = request_erasure(ctx.spark, ctx.lake, ctx.key, args.establishment, args.patient_ref)
    print(f"erasure request {request_id} recorded; it is carried out by the next maintenance run "
          "(or `affluent erasure process`)")
    return 0


def _cmd_erasure_process(args: argparse.Namespace) -> int:
    from jobs import pipeline

    print(json.dumps(pipeline.process_erasure_requests(_ctx()), default=str, indent=2))
    return 0


def _cmd_maintenance(args: argparse.Namespace) -> int:
    from jobs.maintenance import compact_and_vacuum, purge_bronze

    ctx = _ctx()
    print(json.dumps(purge_bronze(ctx.spark, ctx.lake, ctx.consortium.pipeline.bronze_retention_days), default=str))
    print(json.dumps(compact_and_vacuum(ctx.spark, ctx.lake), default=str))
    return 0


def register(sub) -> None:
    """Add the access commands to the ``affluent`` parser."""
    q = sub.add_parser("query", help="Run a SQL query on one project's extract (checked and audited)")
    q.add_argument("--project", required=True)
    q.add_argument("--user", required=True)
    q.add_argument("--engine", choices=("duckdb", "spark"), default="duckdb",
                   help="duckdb over delta-rs for instant answers, spark for scale")
    q.add_argument("--limit", type=int, default=50, help="rows to print")
    q.add_argument("sql")
    q.set_defaults(func=_cmd_query)

    e = sub.add_parser("export", help="Export a query's result as CSV or Parquet, small cells suppressed")
    e.add_argument("--project", required=True)
    e.add_argument("--user", required=True)
    e.add_argument("--engine", choices=("duckdb", "spark"), default="duckdb")
    e.add_argument("--format", choices=("csv", "parquet"), default="csv")
    e.add_argument("--out", required=True, help="destination file (duckdb) or folder (spark)")
    e.add_argument("sql")
    e.set_defaults(func=_cmd_export)

    p = sub.add_parser("publish", help="Rebuild every active project's extract and the gold indicators")
    p.set_defaults(func=_cmd_publish)

    erasure = sub.add_parser("erasure", help="Erasure requests").add_subparsers(dest="action", required=True,
                                                                                  metavar="ACTION")
    req = erasure.add_parser("request", help="Record an establishment's erasure request for one patient")
    req.add_argument("--establishment", required=True)
    req.add_argument("--patient-ref", required=True, help="the patient's reference (MRN) at that establishment")
    req.set_defaults(func=_cmd_erasure_request)
    proc = erasure.add_parser("process", help="Carry out pending erasure requests now (DELETE then VACUUM)")
    proc.set_defaults(func=_cmd_erasure_process)

    m = sub.add_parser("maintenance", help="Bronze retention purge, compaction and VACUUM")
    m.set_defaults(func=_cmd_maintenance)
