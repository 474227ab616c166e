"""A tiny lake and configuration for the researcher gateway's tests (delta-rs only, no Spark)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from jobs.core.lake import Lake

PROJECT = "diabetes_outcomes"       # row-level in the test configuration (Delta Sharing allowed)
MEMBER = "alice.tremblay"
OTHER_PROJECT = "oncology_cohort"   # aggregate-only
OTHER_MEMBER = "chloe.roy"
SILVER_SECRET = "SILVER-ONLY-VALUE"
KEY_VARIABLES = ("AFFLUENT_PSEUDONYM_KEY", "AFFLUENT_PSEUDONYM_KEY_FILE", "AIRFLOW_CONN_AFFLUENT_PSEUDONYM_KEY")
REPO = Path(__file__).resolve().parents[1]


def make_config(source: Path, target: Path) -> Path:
    """A copy of the shipped configuration where ``diabetes_outcomes`` allows row-level results."""
    shutil.copytree(source, target)
    path = target / "projects" / f"{PROJECT}.yaml"
    path.write_text(path.read_text(encoding="utf-8") + "row_level: true\n", encoding="utf-8")
    return target


def remove_member(config: Path, project: str, user: str) -> None:
    path = config / "projects" / f"{project}.yaml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(f"{user}, ", "").replace(f", {user}", ""), encoding="utf-8")


def patients() -> pa.Table:
    return pa.table({"person_id": [f"p{i:02d}" for i in range(15)],
                     "gender_source_value": ["female" if i % 2 else "male" for i in range(15)],
                     "year_of_birth": pa.array([1950 + i for i in range(15)], pa.int32()),
                     "postal_prefix": ["H2X"] * 15})


def encounters() -> pa.Table:
    return pa.table({"visit_occurrence_id": [f"v{i:02d}" for i in range(30)],
                     "person_id": [f"p{i % 15:02d}" for i in range(30)],
                     "establishment_id": ["chu_laurentides"] * 30,
                     "visit_start_date": [dt.date(2026, 1, 1 + i % 28) for i in range(30)],
                     "visit_end_date": [dt.date(2026, 1, 1 + i % 28) for i in range(30)],
                     "visit_source_value": ["inpatient" if i < 24 else "emergency" for i in range(30)]})


def make_lake(root: Path) -> Lake:
    """Extracts of two projects, plus silver, bronze and ops tables the gateway must never reach."""
    from deltalake import write_deltalake

    lake = Lake(str(root))
    write_deltalake(lake.project(PROJECT, "patient"), patients())
    write_deltalake(lake.project(PROJECT, "encounter"), encounters())
    write_deltalake(lake.project(OTHER_PROJECT, "patient"),
                    pa.table({"person_id": ["q1", "q2"], "gender_source_value": ["female", "male"],
                              "year_of_birth": pa.array([1970, 1971], pa.int32())}))
    secret = pa.table({"person_id": ["p00"], "note": [SILVER_SECRET]})
    for path in (lake.silver("patient"), lake.silver("encounter"), lake.bronze("patient"), lake.ops("batch_log")):
        write_deltalake(path, secret)
    return lake


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    env.update(extra)
    return env


def start_gateway(lake: Lake, config: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.app.cli", "gateway", "--lake", lake.root, "--config", str(config),
         "--port", str(port)], env=env or clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def wait_healthy(process: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the gateway did not answer in time")


# An aggregate-only project's small lake: 30 persons, one target (TARGET) with a rare diagnosis and lab value.
TARGET = "p00"
TARGET_CODE = "E10.9"
TARGET_LAB = 250.0
DP_PERSONS = 30


def make_dp_lake(root: Path, target_has_code: bool = True) -> Lake:
    """``diabetes_outcomes`` extracts for the differential-privacy tests (delta-rs only)."""
    from deltalake import write_deltalake

    lake = Lake(str(root))
    persons = [f"p{i:02d}" for i in range(DP_PERSONS)]
    write_deltalake(lake.project(PROJECT, "patient"), pa.table({
        "person_id": persons, "gender_source_value": ["female" if i % 2 else "male" for i in range(DP_PERSONS)],
        "year_of_birth": pa.array([1950 + i for i in range(DP_PERSONS)], pa.int32()),
        "postal_prefix": ["H2X"] * DP_PERSONS}))
    visits = [(f"v{i:02d}{k}", p) for i, p in enumerate(persons) for k in range(2)]
    write_deltalake(lake.project(PROJECT, "encounter"), pa.table({
        "visit_occurrence_id": [v for v, _ in visits], "person_id": [p for _, p in visits],
        "establishment_id": ["chu_laurentides"] * len(visits),
        "visit_start_date": [dt.date(2026, 1, 1 + i % 28) for i in range(len(visits))],
        "visit_end_date": [dt.date(2026, 1, 1 + i % 28) for i in range(len(visits))],
        "visit_source_value": ["=1+1" if i == 0 else "inpatient" if i % 3 else "emergency"
                               for i in range(len(visits))],
        "visit_concept_id": pa.array([0 if i == 0 else 9201 if i % 3 else 9203 for i in range(len(visits))],
                                     pa.int32())}))
    codes = [TARGET_CODE if p == TARGET and target_has_code else "E11.9" for _, p in visits]
    write_deltalake(lake.project(PROJECT, "diagnosis"), pa.table({
        "condition_occurrence_id": [f"c{v}" for v, _ in visits], "person_id": [p for _, p in visits],
        "visit_occurrence_id": [v for v, _ in visits], "condition_start_date": [dt.date(2026, 1, 2)] * len(visits),
        "condition_source_value": codes, "condition_source_vocabulary": ["ICD10CA"] * len(visits)}))
    write_deltalake(lake.project(PROJECT, "lab_result"), pa.table({
        "measurement_id": [f"m{v}" for v, _ in visits], "person_id": [p for _, p in visits],
        "measurement_date": [dt.date(2026, 1, 2)] * len(visits), "measurement_source_value": ["4548-4"] * len(visits),
        "value_as_number": [TARGET_LAB if p == TARGET else 6.0 + (i % 4) for i, (_, p) in enumerate(visits)],
        "unit_source_value": ["%"] * len(visits)}))
    return lake


def make_dp_config(source: Path, target: Path, count_rounding: int | None = None, **privacy) -> Path:
    """A copy of the shipped configuration whose aggregate-only ``diabetes_outcomes`` has ``privacy`` overrides."""
    import yaml

    shutil.copytree(source, target)
    path = target / "projects" / f"{PROJECT}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["privacy"].update(privacy)
    if count_rounding is not None:
        data["count_rounding"] = count_rounding
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return target
