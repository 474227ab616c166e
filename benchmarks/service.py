"""A small batch end to end: through the warm Spark service, against a fresh in-process Spark.

Usage::

    .venv/bin/python -m benchmarks.service                       # ~100-row batches, 3 rounds
    .venv/bin/python -m benchmarks.service --patients 40 --rounds 2 --json out.json

Generates a consortium (``--patients``, two batches: a full one, then an
incremental one) and picks the establishment whose full batch is the
smallest. Each *round* lands both of its batches into a fresh lake with
``affluent run`` (all four stages), the way a data engineer runs it, twice:

- **in-process**: a fresh ``affluent run --classic`` process that starts its
  own Spark (JVM start and cold queries included, as every command and
  Airflow task did before the service);
- **service**: the same command as a thin client of one Spark service
  (``affluent spark start``, started once before the first round, its start
  time printed apart), no JVM of its own.

Prints per batch: rows delivered, seconds of each way, the ratio, and the
Delta commits the batch made (every table of every zone, read from the logs).
The first service round pays the service's first compilation of each query;
later rounds are what a deployment sees once warm. Figures only, nothing is
asserted about time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.probe import code_version, delta_commits, delta_versions  # noqa: E402
from jobs.core.settings import PROJECT_ROOT  # noqa: E402

CLI = [sys.executable, "-m", "jobs.app.cli"]
SEED = 20261206


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run(args: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run(CLI + args, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"`affluent {' '.join(args)}` failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def _generate(work: Path, patients: int, env: dict[str, str]) -> tuple[Path, str, list[tuple[str, int]]]:
    out = work / "consortium"
    subprocess.run(CLI + ["generate", "--out", str(out), "--patients", str(patients), "--batches", "2",
                                 "--seed", str(SEED), "--defect-rate", "0.02"],
                   env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    rows = _rows_from_landing(out / "landing")
    establishment = min(rows, key=lambda e: rows[e][0][1])
    return out / "landing", establishment, rows[establishment]


def _rows_from_landing(landing: Path) -> dict[str, list[tuple[str, int]]]:
    """Data rows delivered per establishment and batch (manifests' counts), batches in delivery order."""
    found: dict[str, list[tuple[str, int]]] = {}
    for manifest in sorted(landing.glob("*/*/manifest.json")):
        batch = manifest.parent
        data = json.loads(manifest.read_text())
        total = sum(int(f.get("rows", 0) or 0) for f in data.get("files", []))
        found.setdefault(batch.parent.name, []).append((batch.name, total))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="affluent-bench-service-"))
    env = dict(os.environ)
    for name in ("AFFLUENT_SPARK_REMOTE", "AFFLUENT_SPARK_TOKEN"):
        env.pop(name, None)
    if not (env.get("AFFLUENT_PSEUDONYM_KEY") or env.get("AFFLUENT_PSEUDONYM_KEY_FILE")):
        env["AFFLUENT_PSEUDONYM_KEY"] = secrets.token_hex(32)  # throwaway key for synthetic data
    env["AFFLUENT_SPARK_STATE"] = str(work / "service")
    env["AFFLUENT_SPARK_PORT"] = str(_free_port())
    landing, establishment, batches = _generate(work, args.patients, env)
    env["AFFLUENT_LANDING_ROOT"] = str(landing)
    print(f"[service] {establishment}: batches {', '.join(f'{b} ({n} rows)' for b, n in batches)}", flush=True)

    started = time.monotonic()
    subprocess.run(CLI + ["spark", "start"], env=env, cwd=PROJECT_ROOT, check=True, capture_output=True)
    service_start = time.monotonic() - started
    token = (work / "service" / "token").read_text().strip()
    client = {k: v for k, v in env.items() if k not in ("AFFLUENT_PSEUDONYM_KEY", "AFFLUENT_PSEUDONYM_KEY_FILE")}
    client |= {"AFFLUENT_SPARK_REMOTE": f"sc://localhost:{env['AFFLUENT_SPARK_PORT']}", "AFFLUENT_SPARK_TOKEN": token}
    print(f"[service] started in {service_start:.1f} s", flush=True)

    rounds: list[dict] = []
    try:
        for number in range(1, args.rounds + 1):
            result: dict[str, dict] = {}
            for way, way_env in (("in_process", env | {"AFFLUENT_SPARK_MODE": "classic"}), ("service", client)):
                lake = work / f"lake-{way}-{number}"
                way_env = way_env | {"AFFLUENT_LAKE_ROOT": str(lake)}
                for batch, rows in batches:
                    before = delta_versions(lake) if lake.exists() else {}
                    seconds = _run(["run", "--establishment", establishment, "--batch", batch], way_env)
                    commits = sum(delta_commits(before, delta_versions(lake)).values())
                    result.setdefault(batch, {"rows": rows})[way] = {"seconds": round(seconds, 2), "commits": commits}
                    print(f"[service] round {number} {way:>10} batch {batch} ({rows} rows): {seconds:7.2f} s, "
                          f"{commits} Delta commits", flush=True)
                shutil.rmtree(lake, ignore_errors=True)
            rounds.append(result)
    finally:
        subprocess.run(CLI + ["spark", "stop"], env=env, cwd=PROJECT_ROOT, capture_output=True)

    summary: dict[str, dict] = {}
    for batch, rows in batches:
        warm = [r[batch]["service"]["seconds"] for r in rounds[1:]] or [rounds[0][batch]["service"]["seconds"]]
        fresh = [r[batch]["in_process"]["seconds"] for r in rounds]
        summary[batch] = {
            "rows": rows,
            "in_process_median_s": round(statistics.median(fresh), 2),
            "service_first_s": rounds[0][batch]["service"]["seconds"],
            "service_warm_median_s": round(statistics.median(warm), 2),
            "commits": rounds[-1][batch]["service"]["commits"],
        }
        s = summary[batch]
        print(f"[service] batch {batch} ({rows} rows): in-process {s['in_process_median_s']:.1f} s, service "
              f"{s['service_warm_median_s']:.1f} s warm ({s['service_first_s']:.1f} s first): "
              f"×{s['in_process_median_s'] / s['service_warm_median_s']:.2f} faster, {s['commits']} commits",
              flush=True)
    record = {"establishment": establishment, "patients": args.patients, "service_start_s": round(service_start, 1),
              "rounds": rounds, "summary": summary, "code": code_version(PROJECT_ROOT),
              "cores": os.cpu_count(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
