"""The gateway in the demo: start it, issue a token, query through it, stop it.

Example::

    from jobs.research.gateway.demo import show
    show("demo/consortium/lake", "config")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from jobs.research.gateway.confine import KEY_VARIABLES, landlock_abi

DEMO_PROJECT = "diabetes_outcomes"
DEMO_MEMBER = "alice.tremblay"
# Visits per standard visit concept (OMOP 9201 inpatient, 9202 outpatient, 9203 emergency): one row per
# concept across establishments, whether they sent FHIR's ActCode (AMB) or words (outpatient).
# diabetes_outcomes is aggregate-only: the answer is differentially private, with a 95 % interval per cell.
DEMO_SQL = "SELECT visit_concept_id, count(*) AS visits FROM encounter GROUP BY visit_concept_id"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(process: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway stopped at start: {process.stderr.read() if process.stderr else ''}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the gateway did not answer on {url}")


def show(lake_root: str, config_dir: str | Path, project: str = DEMO_PROJECT, user: str = DEMO_MEMBER,
         sql: str = DEMO_SQL) -> int:
    """Start ``affluent gateway`` (no key in its environment), query it as ``user`` over HTTP, print, stop.

    Returns 0 when the query was answered (or refused with a reason), 1 when the gateway failed.
    """
    from jobs.research.gateway.client import GatewayClient, GatewayRefused
    from jobs.research.gateway.tokens import TokenStore, default_store_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    command = [sys.executable, "-m", "jobs.app.cli", "gateway", "--lake", lake_root, "--config", str(config_dir),
               "--port", str(port)] + (["--unconfined"] if landlock_abi() < 1 else [])
    store = TokenStore(default_store_path(lake_root))
    print(f"Starting the researcher gateway on {url} (no key in its environment"
          f"{', confined by Landlock' if landlock_abi() >= 1 else ', UNCONFINED: no Landlock here'}) …")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    token, record = store.issue(project, user)
    try:
        _wait(process, url)
        print(f"Token {record.token_id} issued to {user} for {project}; query over HTTP:\n  {sql}")
        client = GatewayClient(url, token)
        try:
            result = client.query(project, sql)
        except GatewayRefused as exc:
            print(f"refused by the gateway: {exc}")
        else:
            print(result.to_text())
            for note in result.notes:
                print(f"note: {note}")
            if result.privacy:
                left = result.privacy["budget_left"]
                print(f"privacy: this answer spent epsilon {result.privacy['epsilon']:g} of {user}'s budget; "
                      f"{left['epsilon']:g} left for {left['period']}. Each *_low95/*_high95 pair is the cell's "
                      "95 % interval: the true value lies in it 19 times out of 20.")
            print(f"(audit event {result.audit_event}; `affluent audit verify` checks the chain)")
        finally:
            client.close()
        return 0
    except RuntimeError as exc:
        print(f"gateway demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        store.revoke(record.token_id)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
