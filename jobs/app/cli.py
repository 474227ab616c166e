"""The ``affluent`` command line: configuration checks, generation, the flow, demo.

Run ``affluent --help`` or ``affluent <command> --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_config_check(args: argparse.Namespace) -> int:
    from jobs.core.config import ConfigError, load_consortium
    from jobs.core.settings import Settings

    root = Path(args.config or Settings.from_env().config_dir)
    try:
        consortium = load_consortium(root)
    except ConfigError as exc:
        for problem in exc.problems:
            where = problem if Path(problem.file).is_absolute() else f"{root}/{problem}"
            print(where, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); nothing will run on this configuration.", file=sys.stderr)
        return 1
    print(f"{root}: OK — {len(consortium.establishments)} establishments, {len(consortium.purposes)} purposes, "
          f"{len(consortium.agreements)} agreements, {len(consortium.projects)} projects "
          f"(policy version {consortium.policy_version})")
    return 0


def _cmd_key_generate(args: argparse.Namespace) -> int:
    """Write a new pseudonymisation key file; print where and its fingerprint, never the key."""
    from jobs.privacy.keys import ENV_KEY_FILE, generate_key_file

    path = Path(args.out)
    try:
        key = generate_key_file(path)
    except FileExistsError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"wrote a new pseudonymisation key to {path} (owner read/write only; fingerprint {key.fingerprint}). "
          f"Use it with `export {ENV_KEY_FILE}={path.resolve()}`, keep a copy in the organisation's secret "
          "store, and never commit it: a lost key means new pseudonyms for everyone.")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from jobs.core.config import load_consortium
    from jobs.generate import generate_consortium
    from jobs.core.settings import Settings

    consortium = load_consortium(Settings.from_env().config_dir if not args.config else args.config)
    summary = generate_consortium(Path(args.out), consortium, patients=args.patients, batches=args.batches,
                                  seed=args.seed, defect_rate=args.defect_rate)
    print(summary)
    return 0


# Exit code of a stage command whose batch was refused, stopped or held: the one line on stderr says
# what happened and what to do (the line `affluent batches` shows for the establishment's queue).
EXIT_STOPPED = 3


def _stop_line(ctx, establishment_id: str, exc: Exception) -> str:
    """One line for a batch that cannot go on: its queue's explanation, or the error's first line."""
    from jobs.stages import pipeline

    try:
        queue = pipeline.queue(ctx, establishment_id)
    except pipeline.permanent_failures() + (OSError,):  # the configuration itself may be what failed
        queue = None
    if queue is not None and queue.blocked_by is not None:
        return queue.explain()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{establishment_id}: {first}"


def _stage_command(stage: str):
    def run(args: argparse.Namespace) -> int:
        from jobs.stages import pipeline

        ctx = pipeline.Context.from_env()
        # A rejection, a stop or a hold is the batch's outcome, not a crash: one line, no traceback.
        from jobs.core.writer_lock import BatchAlreadyRunning

        try:
            from jobs.app.spark_client import use_service_here

            use_service_here(args.classic)  # a client of the Spark service (started if none runs), holding no key
            pipeline.require_key(ctx)  # fail closed before anything is read or written
            batches = [args.batch] if args.batch else pipeline.pending(ctx, args.establishment)
            for batch in batches:
                try:
                    if stage == "run":
                        result = pipeline.run_batch(ctx, args.establishment, batch)
                    else:
                        result = getattr(pipeline, stage)(ctx, args.establishment, batch)
                except BatchAlreadyRunning as refused:  # logged in the batch log; not a fault of the batch
                    print(str(refused), file=sys.stderr)
                    return 1
                print(json.dumps({"establishment": args.establishment, "batch": batch, stage: result}, default=str))
            if not batches:
                queue = pipeline.queue(ctx, args.establishment)
                if queue.blocked_by is not None:
                    print(queue.explain(), file=sys.stderr)
                    return EXIT_STOPPED
                print(f"no pending batch for {args.establishment}")
        except pipeline.permanent_failures() as exc:
            print(_stop_line(ctx, args.establishment, exc), file=sys.stderr)
            return EXIT_STOPPED
        return 0
    return run


def _cmd_batches(args: argparse.Namespace) -> int:
    from pyspark.sql import functions as F

    from jobs.stages import pipeline
    from jobs.core.ops import read_batch_log

    from jobs.privacy import safety

    ctx = pipeline.Context.from_env()
    paused = safety.paused_in_airflow()
    if paused is None:
        print("Airflow: not configured here (AIRFLOW_HOME unset or no metadata database): whether publish and "
              "maintenance run is not known.")
    for message in safety.paused_warnings(paused or (), ctx.lake, ctx.consortium.projects):
        print(f"WARNING: {message}")
    # Each queue first: whether it moves, and if not which batch holds it back and why.
    for est in [args.establishment] if args.establishment else sorted(ctx.consortium.establishments):
        print(pipeline.queue(ctx, est).explain())
    log = read_batch_log(ctx.spark, ctx.lake)
    if args.establishment:
        log = log.where(F.col("establishment_id") == args.establishment)
    log.orderBy("establishment_id", "batch_id", "recorded_at").select(
        "establishment_id", "batch_id", "dataset", "stage", "status", "rows_read", "rows_landed",
        "rows_quarantined", "rows_duplicates", "rows_unchanged", "rows_not_collected", "kind", "source_file",
        "message").show(args.limit, truncate=False)
    return 0


def _cmd_batch_decision(args: argparse.Namespace) -> int:
    """A steward's skip or retry of one batch, recorded in the batch log (stage ``steward``)."""
    from jobs.stages import pipeline
    from jobs.core.batchlog import Stage, Status
    from jobs.core.ops import append_batch_log

    ctx = pipeline.Context.from_env()
    queue = pipeline.queue(ctx, args.establishment)
    batch = queue.state_of(args.batch)
    if batch is None:
        print(f"no batch {args.batch} in landing for {args.establishment}", file=sys.stderr)
        return 1
    status = Status.SKIPPED if args.action == "skip" else Status.RETRY
    reason = args.reason or f"retried after {batch.state}"
    append_batch_log(ctx.spark, ctx.lake, [{"establishment_id": args.establishment, "batch_id": args.batch,
                                            "stage": Stage.STEWARD, "status": status,
                                            "message": f"{reason} (by {os.environ.get('USER', 'unknown')})"}])
    if status == Status.SKIPPED:
        # A batch set aside never lands: its pseudonymised rows leave the transient zones now.
        from jobs.stages.maintenance import purge_transient

        removed = {table: n for table, n in purge_transient(ctx.spark, ctx.lake, args.establishment,
                                                             args.batch).items() if n}
        print(f"{args.establishment}/{args.batch}: rows removed from staged/validated: {removed or 'none'}")
    print(f"{args.establishment}/{args.batch}: {status} recorded. {pipeline.queue(ctx, args.establishment).explain()}")
    return 0


def _cmd_onboarding_accept(args: argparse.Namespace) -> int:
    """Accept an onboarding establishment's current profile; its held batches are taken again."""
    from jobs.stages import onboarding, pipeline
    from jobs.core.batchlog import Status

    ctx = pipeline.Context.from_env()
    queue = pipeline.queue(ctx, args.establishment)
    held = [b.batch_id for b in queue.batches if b.status == Status.HELD]
    try:
        digest = onboarding.accept(ctx.spark, ctx.lake, ctx.consortium, args.establishment, args.reason, held)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{args.establishment}: profile {digest[:12]} accepted; batches taken again: {', '.join(held) or 'none'}. "
          f"{pipeline.queue(ctx, args.establishment).explain()}")
    return 0


def _cmd_schema_reference(args: argparse.Namespace) -> int:
    """Write (or check) the generated reference of the canonical schema and the rules."""
    from jobs.app import schema_reference

    path = Path(args.out) if args.out else schema_reference.REFERENCE_PATH
    if args.check:
        if schema_reference.is_current(path):
            print(f"{path}: up to date")
            return 0
        print(f"{path}: out of date; regenerate it with `affluent schema reference`", file=sys.stderr)
        return 1
    print(f"written {schema_reference.write_reference(path)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from jobs.app.demo import run_demo

    return run_demo(patients=args.patients, batches=args.batches, seed=args.seed, defect_rate=args.defect_rate,
                    workdir=Path(args.workdir), classic=args.classic, keep_spark=args.keep_spark)


def _cmd_airflow(args: argparse.Namespace) -> int:
    from jobs.app.airflow_local import run_standalone, stop_standalone
    from jobs.app.demo import airflow_env, describe_lake, prepare_airflow

    from jobs.core import spark_service

    if args.stop:
        code = stop_standalone(Path(args.workdir).resolve() / "airflow")
        _stop_spark_with_airflow(args.stop_spark)
        return code
    env = airflow_env(Path(args.workdir), keep_exported=True)
    print(f"Starting Airflow standalone with the project's DAGs (AIRFLOW_HOME={env['AIRFLOW_HOME']}).")
    for line in describe_lake(env):
        print(f"  {line}")
    if spark_service.spark_mode(args.classic) == spark_service.MODE_SERVICE:
        from jobs.app.spark_client import airflow_client_env, attach

        state, started = attach(env)  # the key goes to the service; the tasks get its address and token only
        env = airflow_client_env(env, state)
        after = "stops with Airflow" if args.stop_spark else "keeps running after Airflow stops (`affluent spark stop`)"
        print(f"  Spark: {'started' if started else 'reusing'} the service at {state.address} (pid {state.pid}); "
              f"every task is its client (connection affluent_spark); it {after}")
    else:
        print("  Spark: classic, one Spark per task process")
    print(f"UI: http://localhost:{args.port}  — login and password are printed by Airflow below and kept in "
          f"{env['AIRFLOW_HOME']}/simple_auth_manager_passwords.json.generated")
    print("Stop with Ctrl-C here, or `make airflow-stop` from another terminal.")
    env["AIRFLOW__API__PORT"] = str(args.port)
    # Task processes reach the API server's execution API; without this they try port 8080 whatever --port says.
    env.setdefault("AIRFLOW__API__BASE_URL", f"http://localhost:{args.port}")
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://localhost:{args.port}/execution/")
    prepare_airflow(env)  # metadata database and the lake writers' pool, before the scheduler starts
    try:
        return run_standalone(env)
    finally:
        _stop_spark_with_airflow(args.stop_spark)


def _stop_spark_with_airflow(asked: bool) -> None:
    """Stop the Spark service when the user asked for it (``--stop-spark``); otherwise say it still runs."""
    from jobs.core import spark_service

    if asked:
        from jobs.core.session import close_clients

        close_clients()  # this process's own session (the key check's) ends before its service
        stopped = spark_service.stop()
        print(f"Spark service at {stopped.address} stopped." if stopped else "No Spark service was running.")
        return
    running = spark_service.read_state()
    if running is not None:
        print(f"The Spark service keeps running at {running.address} (pid {running.pid}); "
              "`affluent spark stop` ends it.")


def _cmd_spark(args: argparse.Namespace) -> int:
    """Start, stop or show the local Spark service that commands and Airflow tasks reach through Spark Connect."""
    from jobs.core import spark_service

    if args.action == "start":
        state = spark_service.start(args.state, args.port)
        print(state.describe())
        print(f"Clients: export AFFLUENT_SPARK_REMOTE={state.address} "
              f"AFFLUENT_SPARK_TOKEN=$(cat {spark_service.token_path(state.state_dir)})")
        return 0
    if args.action == "stop":
        stopped = spark_service.stop(args.state)
        print(f"Spark service at {stopped.address} (pid {stopped.pid}) stopped" if stopped
              else "no Spark service running")
        return 0
    if args.action == "check":
        print(spark_service.check())
        return 0
    running = spark_service.read_state(args.state)
    if running is None:
        print(f"no Spark service running (state folder {spark_service.state_dir(args.state)})")
        return 1
    print(running.describe())
    return 0


def _add_classic(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classic", action="store_true",
                        help="run Spark inside this process instead of as a client of the Spark service "
                        "(as AFFLUENT_SPARK_MODE=classic)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="affluent", description="Affluent: the shared data lake of affiliated "
                                     "health establishments.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="Check the consortium's configuration").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    check = config.add_parser("check", help="Validate every file under config/; print file, key and reason")
    check.add_argument("--config", help="configuration folder (default: AFFLUENT_CONFIG_DIR or ./config)")
    check.set_defaults(func=_cmd_config_check)

    key = sub.add_parser("key", help="The pseudonymisation key").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    key_generate = key.add_parser("generate", help="Write a new random key (32 bytes, hex) to a file only its "
                                  "owner can read; never overwrites")
    key_generate.add_argument("--out", required=True, help="the key file to create (e.g. /run/secrets/affluent)")
    key_generate.set_defaults(func=_cmd_key_generate)

    gen = sub.add_parser("generate", help="Write a synthetic consortium's landing batches and ground truth")
    gen.add_argument("--out", required=True, help="output folder (landing/ and ground_truth/ are created in it)")
    gen.add_argument("--patients", type=int, default=1000)
    gen.add_argument("--batches", type=int, default=3)
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--defect-rate", type=float, default=0.01)
    gen.add_argument("--config", help="configuration folder")
    gen.set_defaults(func=_cmd_generate)

    from jobs.core.batchlog import Stage

    for stage, text in [(Stage.INGEST.value, "Landing → bronze"), (Stage.PSEUDONYMISE.value, "Bronze → staged"),
                        (Stage.VALIDATE.value, "Validate staged rows (Great Expectations)"),
                        (Stage.LAND.value, "MERGE validated rows into silver"), ("run", "All four stages")]:
        p = sub.add_parser(stage, help=f"{text}, for one batch or every pending batch of an establishment")
        p.add_argument("--establishment", required=True)
        p.add_argument("--batch", help="batch id (default: every pending batch, in delivery order)")
        _add_classic(p)
        p.set_defaults(func=_stage_command(stage))

    from jobs.terminology.commands import add_mapping_commands

    add_mapping_commands(sub)

    batches = sub.add_parser("batches", help="Show the batch log: rows read, landed, quarantined, duplicates")
    batches.add_argument("--establishment")
    batches.add_argument("--limit", type=int, default=200)
    batches.set_defaults(func=_cmd_batches)

    batch = sub.add_parser("batch", help="A steward's decision on a batch that blocks its establishment's queue")
    decisions = batch.add_subparsers(dest="action", required=True, metavar="ACTION")
    skip = decisions.add_parser("skip", help="Set the batch aside for good; later batches go on (recorded)")
    skip.add_argument("--reason", required=True, help="why (kept in the batch log)")
    retry = decisions.add_parser("retry", help="Take the batch again once fixed: forgets its earlier stops (recorded)")
    retry.add_argument("--reason", help="what was fixed (kept in the batch log)")
    for decision in (skip, retry):
        decision.add_argument("establishment")
        decision.add_argument("batch")
        decision.set_defaults(func=_cmd_batch_decision)

    onboarding = sub.add_parser("onboarding", help="Establishments onboarding: batches held before land until accepted")
    accept = onboarding.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "accept", help="Accept the establishment's current profile (recorded); its held batches land on their next run")
    accept.add_argument("establishment")
    accept.add_argument("--reason", required=True, help="what was reviewed (kept in ops/onboarding)")
    accept.set_defaults(func=_cmd_onboarding_accept)

    schema = sub.add_parser("schema", help="The canonical schema").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    reference = schema.add_parser("reference", help="Write docs/schema-reference.md: every dataset, column, type, "
                                  "source format and rule, generated from the code")
    reference.add_argument("--out", help="where to write it (default: docs/schema-reference.md)")
    reference.add_argument("--check", action="store_true",
                           help="only say whether the page is up to date (exit 1 if not)")
    reference.set_defaults(func=_cmd_schema_reference)

    demo = sub.add_parser("demo", help="Generate a consortium and run every DAG with Airflow, end to end")
    demo.add_argument("--patients", type=int, default=2000)
    demo.add_argument("--batches", type=int, default=2,
                      help="batches per establishment: one full extract, then incremental ones (default 2)")
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--defect-rate", type=float, default=0.01)
    demo.add_argument("--workdir", default="demo", help="where the demo's lake and Airflow home go")
    demo.add_argument("--keep-spark", action="store_true",
                      help="leave the Spark service running at the end if the demo started it (default: stop it)")
    _add_classic(demo)
    demo.set_defaults(func=_cmd_demo)

    airflow = sub.add_parser("airflow", help="Start `airflow standalone` with the project's DAGs (UI + scheduler)")
    airflow.add_argument("--workdir", default="demo")
    airflow.add_argument("--port", type=int, default=8080)
    airflow.add_argument("--stop", action="store_true", help="stop the Airflow started from this work folder")
    airflow.add_argument("--stop-spark", action="store_true",
                         help="stop the Spark service too when Airflow stops (default: it keeps running, warm, "
                         "for the next command; `affluent spark stop` ends it)")
    _add_classic(airflow)
    airflow.set_defaults(func=_cmd_airflow)

    spark = sub.add_parser("spark", help="The Spark service (Spark Connect) that commands and Airflow tasks share")
    spark.add_argument("action", choices=["start", "stop", "status", "check"],
                       help="start (idempotent), stop, status (of this machine's service), check (reach the "
                       "configured service as a client: address, Spark version, key fingerprint)")
    spark.add_argument("--state", help="state folder (default: AFFLUENT_SPARK_STATE or .cache/spark-service)")
    spark.add_argument("--port", type=int, help="port to listen on, loopback only (default: AFFLUENT_SPARK_PORT, "
                       "15002, or a free one)")
    spark.set_defaults(func=_cmd_spark)

    from jobs.app import cli_access  # researcher, steward and maintenance commands

    cli_access.register(sub)
    return parser


# Exit code of a command that found no Spark service (or could not start one): one line on stderr says where.
EXIT_NO_SPARK = 4


def main(argv: list[str] | None = None) -> int:
    from jobs.core.spark_service import SparkServiceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SparkServiceError as exc:  # the service is down or refused us: where, and what to do; no traceback
        print(str(exc), file=sys.stderr)
        return EXIT_NO_SPARK


if __name__ == "__main__":
    sys.exit(main())
