"""The privacy budget of aggregate-only projects: a durable ledger spent before a query runs.

Each differentially private answer spends (ε, δ) of the asking member's
budget for the current period and of the project's, as declared in the
project's ``privacy`` block (:class:`jobs.core.config.PrivacyBudget`). Spending is
basic sequential composition: the ε of answers add up, and so do their δ.

The ledger is an append-only JSON-lines file under ``ops/privacy_ledger/``,
one line per spend (project, member, period, ε, δ, audit event, time), each
line hash-chained to the one before it. It is written and fsynced under an
exclusive lock *before* the query reads any data, so a crash, a kill or a
failure after that point leaves the budget spent (the conservative side): a
gateway restart reads the same ledger and the same remaining budget.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from jobs.core.config import Project
from jobs.research.gateway import PRIVACY_LEDGER
from jobs.core.lake import Lake
from jobs.privacy.policy import AccessDenied

LEDGER_FILE = "spent.jsonl"
GENESIS = "0" * 64
# Sums of floats drift: a budget is met when within this much.
TOLERANCE = 1e-9

_THREAD_LOCK = threading.Lock()


class BudgetExceeded(AccessDenied):
    """The query would spend more privacy budget than is left; nothing was read."""


@dataclass(frozen=True)
class Balance:
    """What is left of a member's and a project's budget in one period."""

    period: str
    member_epsilon: float
    member_delta: float
    project_epsilon: float | None

    @property
    def epsilon(self) -> float:
        return self.member_epsilon if self.project_epsilon is None else min(self.member_epsilon,
                                                                             self.project_epsilon)

    def describe(self) -> str:
        epsilon, delta = max(round(self.epsilon, 9), 0.0) + 0.0, max(round(self.member_delta, 15), 0.0) + 0.0
        return f"epsilon {epsilon:.4g} and delta {delta:.3g} left for {self.period}"


def ledger_path(lake: Lake) -> Path:
    if "://" in lake.root:
        raise BudgetExceeded("the privacy ledger needs a local ops folder; this lake is remote, so aggregate-only "
                             "projects cannot be answered here")
    return Path(lake.ops(PRIVACY_LEDGER)) / LEDGER_FILE


def period_of(project: Project, today: dt.date) -> str:
    """The budget period ``today`` falls in (``2026-06``, ``2026``, ``2026-06-15`` or ``project``)."""
    return {"day": today.isoformat(), "month": today.strftime("%Y-%m"), "year": str(today.year),
            "project": f"project {project.valid_from}..{project.valid_until}"}[project.privacy.period]


def _entries(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _line_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _balance(entries: list[dict], project: Project, user: str, period: str) -> Balance:
    budget = project.privacy
    mine = [e for e in entries if e["project"] == project.id and e["period"] == period]
    member = [e for e in mine if e["user"] == user]
    return Balance(period=period,
                   member_epsilon=budget.epsilon - sum(e["epsilon"] for e in member),
                   member_delta=budget.delta - sum(e["delta"] for e in member),
                   project_epsilon=None if budget.project_epsilon is None
                   else budget.project_epsilon - sum(e["epsilon"] for e in mine))


def balance(lake: Lake, project: Project, user: str, today: dt.date) -> Balance:
    return _balance(_entries(ledger_path(lake)), project, user, period_of(project, today))


def spend(lake: Lake, project: Project, user: str, epsilon: float, delta: float, today: dt.date,
          event_id: str | None = None) -> Balance:
    """Record the spend of (ε, δ) durably and return what is left; :class:`BudgetExceeded` if it does not fit."""
    path = ledger_path(lake)
    path.parent.mkdir(parents=True, exist_ok=True)
    period = period_of(project, today)
    with _THREAD_LOCK, open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = _entries(path)
            left = _balance(entries, project, user, period)
            if epsilon > left.epsilon + TOLERANCE or delta > left.member_delta + TOLERANCE:
                whose = ("project's" if left.project_epsilon is not None
                         and left.project_epsilon < left.member_epsilon else "your")
                raise BudgetExceeded(
                    f"this query needs epsilon {epsilon:g}" + (f" and delta {delta:g}" if delta else "")
                    + f" but {whose} privacy budget has {left.describe()}; the budget renews with the next "
                    f"{project.privacy.period if project.privacy.period != 'project' else 'project'} "
                    "(or ask the data stewards)")
            entry = {"project": project.id, "user": user, "period": period, "epsilon": epsilon, "delta": delta,
                     "event_id": event_id, "at": dt.datetime.now(dt.timezone.utc).isoformat(),
                     "prev": entries[-1]["hash"] if entries else GENESIS}
            entry["hash"] = _line_hash(entry)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            return _balance(entries + [entry], project, user, period)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def verify_ledger(lake: Lake) -> list[str]:
    """Problems in the ledger's hash chain (an edited, removed or inserted line); empty when intact."""
    problems: list[str] = []
    previous: str | None = GENESIS
    for number, entry in enumerate(_entries(ledger_path(lake)), start=1):
        if entry.get("prev") != previous:
            problems.append(f"line {number}: does not follow the line before it (a line was removed or inserted)")
        if _line_hash(entry) != entry.get("hash"):
            problems.append(f"line {number}: content does not match its hash (edited)")
        previous = entry.get("hash")
    return problems
