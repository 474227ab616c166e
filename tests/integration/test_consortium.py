"""The synthetic consortium through every stage, with real Airflow, Spark, Delta and GX.

The demo (tests/integration/conftest.py) generated one small consortium (three
establishments, two batches, injected defects) and ran it through the DAGs;
each test checks one promise of the flow against the generator's ground truth.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from jobs.stages import pipeline
from jobs.core.settings import Settings
from tests.conftest import CONFIG_DIR, TEST_KEY
from tests.integration.conftest import PATIENTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(spark, demo):
    """The demo's lake, read with this session's Spark; the second item holds ``out/ground_truth``."""
    os.environ["AFFLUENT_PSEUDONYM_KEY"] = TEST_KEY
    ctx = pipeline.Context(Settings.from_env(lake_root=str(demo.lake_root), config_dir=str(CONFIG_DIR),
                                             landing_root=str(demo.generated / "landing")))
    return ctx, demo.generated


def _ground_truth(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / "ground_truth" / name).read_text().splitlines() if line]


def _delivered_file(ctx, establishment_id: str, batch_id: str, reference: str) -> str:
    """The manifest path of a file the lake names ``<batch_id>#<index>`` (file names stay in landing)."""
    folder = ctx.settings.landing / ctx.consortium.establishment(establishment_id).landing_folder / batch_id
    index = int(reference.split("#", 1)[1])
    return json.loads((folder / "manifest.json").read_text())["files"][index]["path"]


def _csv_establishments(ctx) -> set[str]:
    return {e for e, est in ctx.consortium.establishments.items() if est.input.format == "csv"}


def test_ingest_quarantine_matches_the_ground_truth_exactly(run):
    ctx, root = run
    expected = Counter((d["establishment"], d["batch_id"], d["file"], d["line"], d["rule"])
                       for d in _ground_truth(root, "defects.jsonl")
                       if d["rule"].startswith("ingest.") and d["establishment"] in _csv_establishments(ctx))
    rows = (ctx.spark.read.format("delta").load(ctx.lake.quarantine()).where(F.col("stage") == "ingest")
            .where(F.col("establishment_id").isin(*_csv_establishments(ctx))).collect())
    got = Counter((r.establishment_id, r.batch_id, _delivered_file(ctx, r.establishment_id, r.batch_id, r.source_file),
                   r.source_line, r.rule) for r in rows)
    assert got == expected


def test_every_injected_defect_is_quarantined_under_its_rule_and_no_clean_row_is(run):
    ctx, root = run
    expected = Counter((d["establishment"], d["batch_id"], d["file"], d["line"], d["rule"])
                       for d in _ground_truth(root, "defects.jsonl") if d["expected"] == "quarantine")
    assert {rule for *_, rule in expected} >= {"conformance.date", "plausibility.future_date", "conformance.code",
                                               "completeness.required", "ingest.malformed_line", "ingest.encoding"}
    rows = ctx.spark.read.format("delta").load(ctx.lake.quarantine()).collect()
    got = Counter((r.establishment_id, r.batch_id, _delivered_file(ctx, r.establishment_id, r.batch_id, r.source_file),
                   r.source_line, r.rule) for r in rows)
    missing, extra = expected - got, got - expected
    assert not missing and not extra, f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"


def test_exact_duplicates_are_dropped_and_counted(run):
    ctx, root = run
    expected = Counter((d["establishment"], d["batch_id"], d["dataset"])
                       for d in _ground_truth(root, "defects.jsonl") if d["expected"] == "duplicate")
    log = (ctx.spark.read.format("delta").load(ctx.lake.ops("batch_log"))
           .where((F.col("stage") == "pseudonymise") & (F.col("rows_duplicates") > 0)).collect())
    assert Counter({(r.establishment_id, r.batch_id, r.dataset): r.rows_duplicates for r in log}) == expected


def _identifiers(root: Path) -> set[str]:
    values: set[str] = set()
    for person in _ground_truth(root, "persons.jsonl"):
        for site in person["establishments"]:
            for key in ("mrn", "patient_ref", "nam_sent", "family_name", "given_name", "street_address",
                        "phone", "email"):
                if site.get(key) and len(str(site[key])) >= 5:
                    values.add(str(site[key]))
    return values


def test_no_identifier_outside_landing_and_bronze(run):
    ctx, root = run
    identifiers = _identifiers(root)
    assert len(identifiers) > PATIENTS
    lake = Path(ctx.lake.root)
    scanned = 0
    for path in lake.rglob("*"):
        rel = path.relative_to(lake).parts
        if not path.is_file() or rel[0] in ("landing", "bronze"):
            continue
        if path.suffix == ".parquet":
            text = pq.ParquetFile(path).read().to_pandas().to_csv()
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
        scanned += 1
        leaked = [v for v in identifiers if v in text]
        assert not leaked, f"{path}: {leaked[:3]}"
    assert scanned > 20


def test_every_batch_reconciles(run):
    ctx, _ = run
    from jobs.stages.land import reconcile

    rows = reconcile(ctx.spark, ctx.lake).collect()
    assert rows and all(r.holds for r in rows), [r for r in rows if not r.holds]


def test_rerunning_a_batch_changes_no_table(run):
    ctx, _ = run
    from jobs.core.tables import table_version

    paths = [p for d in ("patient", "encounter", "consent") for p in (ctx.lake.bronze(d), ctx.lake.staged(d), ctx.lake.silver(d))]
    paths += [ctx.lake.quarantine(), ctx.lake.ops("batch_log")]
    before = {p: table_version(ctx.spark, p) for p in paths}
    pipeline.run_batch(ctx, "chu_laurentides", "20260105-001")
    assert {p: table_version(ctx.spark, p) for p in paths} == before



def _decisions_in_force(consents: list[dict], purpose: str, day: str) -> list[dict]:
    """Consent decisions of the ground truth that count for ``purpose`` on ``day`` (independent of jobs.privacy.consent).

    Silver holds each consent record's last delivered version that was not quarantined;
    a delivered deletion removes the record. A permit counts from its decision date within
    its validity; a refusal or withdrawal counts once decided.
    """
    final: dict[tuple, dict | None] = {}
    for row in sorted(consents, key=lambda r: r["batch_id"]):
        record = (row["establishment"], row["consent_ref"])
        if row["deleted"]:
            final[record] = None
        elif row["expected"] != "quarantine":
            final[record] = row
    in_force = []
    for row in filter(None, final.values()):
        if row["purpose"] not in (purpose, None):
            continue
        if row["decision"] == "permit":
            if not (row["decision_date"] and row["decision_date"] <= day and (row["valid_from"] or "") <= day
                    and (row["valid_until"] or "9999") >= day):
                continue
        elif row["decision_date"] and row["decision_date"] > day:
            continue
        in_force.append(row)
    return in_force


def test_extracts_hold_exactly_the_persons_the_consent_ground_truth_allows(run):
    """Recomputed from the generator's consent history: per person, the latest decision across establishments."""
    import hashlib
    import hmac

    from jobs.core import clock
    from jobs.privacy.keys import load_key
    from jobs.privacy.policy import shared_establishments

    ctx, root = run  # the demo ran the publish DAG
    today = clock.today()
    key = load_key({"AFFLUENT_PSEUDONYM_KEY": TEST_KEY}, use_airflow=False)
    consents = _ground_truth(root, "consents.jsonl")
    patients = ctx.spark.read.format("delta").load(ctx.lake.silver("patient")).select(
        "establishment_id", "patient_key", "person_id").collect()
    person_of = {(r.establishment_id, r.patient_key): r.person_id for r in patients}

    def person(establishment: str, patient_ref: str) -> str:
        patient_key = hmac.new(key.establishment_key(establishment), f"patient:{patient_ref}".encode(),
                               hashlib.sha256).hexdigest()
        return person_of[(establishment, patient_key)]

    checked = 0
    for project in ctx.consortium.projects.values():
        regime = ctx.consortium.purposes[project.purpose].regime
        latest: dict[str, tuple] = {}
        for row in _decisions_in_force(consents, project.purpose, today.isoformat()):
            rank = (row["decision_date"] or "9999", row["decision"] != "permit")  # same day: the refusal wins
            pid = person(row["establishment"], row["patient_ref"])
            if pid not in latest or rank > latest[pid][0]:
                latest[pid] = (rank, row["decision"] == "permit")
        sharing = set(shared_establishments(ctx.consortium, project, "patient"))
        seen_there = {r.person_id for r in patients if r.establishment_id in sharing and r.person_id}
        allowed = {pid for pid in seen_there if (latest[pid][1] if pid in latest else regime == "opt_out")}
        project_key = key.project_key(project.id)
        expected = {hmac.new(project_key, pid.encode(), hashlib.sha256).hexdigest() for pid in allowed}
        extract = ctx.spark.read.format("delta").load(ctx.lake.project(project.id, "patient"))
        got = {r.person_id for r in extract.select("person_id").collect()}
        assert got == expected, (project.id, len(got - expected), len(expected - got))
        assert len(allowed) < len(seen_there)  # consent filtered someone out
        checked += len(expected)
    assert checked > 0


def test_every_delta_table_opens_without_spark_as_the_readme_says(run):
    """Each table of every zone reads with delta-rs (scan) and DuckDB with Spark's row count;
    ``to_pyarrow_table`` works exactly on the tables without deletion vectors."""
    import duckdb
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaProtocolError

    from jobs.core.arrow_tables import has_deletion_vectors, read_table

    ctx, _ = run
    tables = sorted(str(log.parent) for log in Path(ctx.lake.root).rglob("_delta_log"))
    assert any("/silver/" in t for t in tables) and any("/projects/" in t for t in tables)
    with_vectors = set()
    for path in tables:
        expected = ctx.spark.read.format("delta").load(path).count()
        arrow = read_table(path)
        assert arrow.num_rows == expected, path
        assert duckdb.connect().execute("SELECT count(*) FROM arrow").fetchall()[0][0] == expected, path
        if has_deletion_vectors(path):
            with_vectors.add(path.removeprefix(ctx.lake.root))
            with pytest.raises(DeltaProtocolError):
                DeltaTable(path).to_pyarrow_table()
        else:
            assert DeltaTable(path).to_pyarrow_table().num_rows == expected, path
    assert with_vectors and all(p.startswith("/silver/") for p in with_vectors), with_vectors
