"""``affluent`` commands for researchers, stewards and maintenance."""

from __future__ import annotations

import argparse
import json
import sys


def _ctx():
    from jobs.stages import pipeline

    return pipeline.Context.from_env()


def _cmd_query(args: argparse.Namespace) -> int:
    from jobs.research.gateway.client import GatewayClient, GatewayRefused

    try:
        result = GatewayClient.from_env().query(args.project, args.sql)
    except GatewayRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    print(result.to_text(args.limit))
    for note in ([f"{result.suppressed_cells} cell(s) suppressed"] if result.suppressed_cells else []) + result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jobs.research.gateway.client import GatewayClient, GatewayRefused

    try:
        export = GatewayClient.from_env().export(args.project, args.sql, args.format)
    except GatewayRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(export.content)
    print(f"{out}: {export.rows} row(s), {export.suppressed_cells} cell(s) suppressed "
          f"(audit event {export.audit_event})")
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    # Only light modules here: the process is confined before pyarrow or DuckDB start threads.
    from jobs.research.gateway.confine import ConfinementUnavailable, KeyVisibleError
    from jobs.research.gateway.server import GatewaySettings, serve

    settings = GatewaySettings.from_env(lake_root=args.lake, config_dir=args.config, host=args.host, port=args.port,
                                        token_store=args.token_store)
    try:
        serve(settings, unconfined=args.unconfined)
    except (KeyVisibleError, ConfinementUnavailable) as exc:
        print(f"affluent gateway: refusing to start: {exc}", file=sys.stderr)
        return 3
    return 0


def _token_store():
    from jobs.research.gateway.tokens import TokenStore, default_store_path
    from jobs.core.settings import Settings

    return TokenStore(default_store_path(Settings.from_env().lake_root))


def _cmd_token_issue(args: argparse.Namespace) -> int:
    import datetime as dt

    from jobs.core.config import load_consortium
    from jobs.core.settings import Settings

    consortium = load_consortium(Settings.from_env().config_dir)
    project = consortium.projects.get(args.project)
    if project is None or args.user not in project.members:
        print(f"refused: {args.user!r} is not a member of project {args.project!r} in the configuration",
              file=sys.stderr)
        return 2
    expires = dt.date.fromisoformat(args.expires) if args.expires else project.valid_until
    token, record = _token_store().issue(args.project, args.user, expires)
    print(f"token {record.token_id} for {record.user} on {record.project_id}, expires {record.expires}.",
          file=sys.stderr)
    print("Give it to the researcher over a private channel; it is shown only now:", file=sys.stderr)
    print(token)
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    from jobs.research.gateway.tokens import TokenError

    try:
        record = _token_store().revoke(args.token_id)
    except TokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"token {record.token_id} ({record.user} on {record.project_id}) revoked at {record.revoked_at}")
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    from jobs.core import clock

    today = clock.today()
    print(f"{'token_id':<18}{'project':<22}{'user':<22}{'expires':<12}{'state':<9}issued_at")
    for record in sorted(_token_store().records().values(), key=lambda r: r.issued_at):
        print(f"{record.token_id:<18}{record.project_id:<22}{record.user:<22}{str(record.expires):<12}"
              f"{record.state(today):<9}{record.issued_at}")
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from jobs.research.gateway.audit import verify
    from jobs.core.lake import Lake
    from jobs.core.settings import Settings

    from jobs.privacy.privacy_budget import verify_ledger

    lake = Lake(args.lake or Settings.from_env().lake_root)
    result = verify(lake)
    ledger = verify_ledger(lake) if "://" not in lake.root else []
    for problem in result.problems + [f"privacy ledger {p}" for p in ledger]:
        print(f"TAMPERED: {problem}", file=sys.stderr)
    if ledger:
        return 1
    if not result.ok:
        print(f"audit chain broken: {len(result.problems)} problem(s) in {result.rows} row(s)", file=sys.stderr)
        return 1
    print(f"audit chain intact: {result.rows} row(s); last hash {result.last_hash} (`affluent audit anchor` records "
          "it where the gateway cannot write, to detect a truncation later)")
    return 0


def _cmd_audit_anchor(args: argparse.Namespace) -> int:
    from jobs.research.gateway.audit import AuditError, ENV_ANCHOR_KEY, anchor
    from jobs.core.lake import Lake
    from jobs.core.settings import Settings

    try:
        head = anchor(Lake(args.lake or Settings.from_env().lake_root))
    except AuditError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    signed = "signed" if head["signature"] else f"UNSIGNED (set {ENV_ANCHOR_KEY} to sign)"
    print(f"audit anchored at seq {head['seq']} ({head['rows']} row(s)), hash {head['row_hash']}, {signed}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from jobs.stages import pipeline

    print(json.dumps(pipeline.publish_all(_ctx()), default=str, indent=2))
    return 0


def _cmd_erasure_request(args: argparse.Namespace) -> int:
    from jobs.privacy.erasure import request_erasure

    ctx = _ctx()
    request_id = request_erasure(ctx.spark, ctx.lake, ctx.key, args.establishment, args.patient_ref)
    print(f"erasure request {request_id} recorded; it is carried out by the next maintenance run "
          "(or `affluent erasure process`)")
    return 0


def _cmd_erasure_process(args: argparse.Namespace) -> int:
    from jobs.stages import pipeline

    print(json.dumps(pipeline.process_erasure_requests(_ctx()), default=str, indent=2))
    return 0


def _cmd_maintenance(args: argparse.Namespace) -> int:
    from jobs.stages.maintenance import compact_and_vacuum, purge_bronze

    ctx = _ctx()
    print(json.dumps(purge_bronze(ctx.spark, ctx.lake, ctx.consortium.pipeline.bronze_retention_days), default=str))
    print(json.dumps(compact_and_vacuum(ctx.spark, ctx.lake), default=str))
    return 0


def register(sub) -> None:
    """Add the access commands to the ``affluent`` parser."""
    q = sub.add_parser("query", help="Run a SQL query on one project's extract through the gateway "
                       "(AFFLUENT_GATEWAY_URL, AFFLUENT_TOKEN)")
    q.add_argument("--project", required=True)
    q.add_argument("--limit", type=int, default=50, help="rows to print")
    q.add_argument("sql")
    q.set_defaults(func=_cmd_query)

    e = sub.add_parser("export", help="Export a checked query result as CSV or Parquet through the gateway")
    e.add_argument("--project", required=True)
    e.add_argument("--format", choices=("csv", "parquet"), default="csv")
    e.add_argument("--out", required=True, help="destination file")
    e.add_argument("sql")
    e.set_defaults(func=_cmd_export)

    g = sub.add_parser("gateway", help="Start the researcher gateway (HTTP; no key, confined with Landlock)")
    g.add_argument("--lake", help="lake root (default: AFFLUENT_LAKE_ROOT)")
    g.add_argument("--config", help="configuration folder (default: AFFLUENT_CONFIG_DIR)")
    g.add_argument("--host", help="listen address (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="port (default 8765)")
    g.add_argument("--token-store", help="token store file (default: AFFLUENT_TOKEN_STORE or <lake>/access/tokens.jsonl)")
    g.add_argument("--unconfined", action="store_true",
                   help="run without Landlock where it is unavailable (loud warning; confine it otherwise)")
    g.set_defaults(func=_cmd_gateway)

    token = sub.add_parser("token", help="Researchers' gateway tokens (stewards)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    issue = token.add_parser("issue", help="Issue a token for one member of one project (printed once)")
    issue.add_argument("--project", required=True)
    issue.add_argument("--user", required=True)
    issue.add_argument("--expires", help="last valid day, YYYY-MM-DD (default: the project's valid_until)")
    issue.set_defaults(func=_cmd_token_issue)
    revoke = token.add_parser("revoke", help="Revoke a token by its id")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=_cmd_token_revoke)
    token.add_parser("list", help="List tokens (ids, never secrets)").set_defaults(func=_cmd_token_list)

    audit = sub.add_parser("audit", help="The access audit (stewards)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    verify = audit.add_parser("verify", help="Recompute the audit's hash chain; exit 1 if a row was altered or deleted")
    verify.add_argument("--lake", help="lake root (default: AFFLUENT_LAKE_ROOT)")
    verify.set_defaults(func=_cmd_audit_verify)
    anchor = audit.add_parser("anchor", help="Record the audit chain's head where the gateway cannot write "
                                             "(signed with AFFLUENT_AUDIT_ANCHOR_KEY); verify then detects truncation")
    anchor.add_argument("--lake", help="lake root (default: AFFLUENT_LAKE_ROOT)")
    anchor.set_defaults(func=_cmd_audit_anchor)

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
