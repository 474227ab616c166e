"""Publish: silver + consent + project policies → project extracts and gold.

For each active project, one Delta table per dataset under
``projects/<project>/<dataset>`` holding only:

- persons whose consent allows the project's purpose on the publish date;
- rows of establishments that are in the project *and* whose sharing
  agreement covers that dataset for that purpose;
- the columns the project was granted;
- project-specific pseudonyms: every identifier column (``person_id`` and the
  record ids) becomes ``HMAC(project_key, value)``, so two projects' extracts
  share no identifier and cannot be joined, while joins inside one project
  (``visit_occurrence_id`` across tables) still work;
- dates at the project's precision: ``day`` keeps the day, ``month`` and
  ``year`` truncate to the first day of the month or year (timestamps too;
  ``month_of_birth`` is dropped to null at ``year``); ``shifted`` moves every
  date and timestamp of a person by one offset of ±1 to ±365 days (never 0),
  taken from a keyed hash of ``person_id`` under a per-project key, so the
  intervals between a person's events are exact and the offset differs per
  project. ``year_of_birth`` is never shifted (shifting it would distort ages
  by a year while hiding nothing a ±1 year shift could), but
  ``month_of_birth`` is dropped to null, since with real months of birth the
  shift of a person's dates could be narrowed down.

Each publish rebuilds every extract from scratch (Delta overwrite): it is
simple, idempotent, and a withdrawn consent, a person erased, an establishment
or column removed from the policy all simply fall out of the rebuild. Old
versions of an extract stay in its Delta history until the maintenance VACUUM;
the access layer only ever reads the current version. An erasure removes
them physically at once (:mod:`jobs.privacy.erasure`).

The patient extract is k-anonymous on the project's ``quasi_identifiers``
(:mod:`jobs.privacy.kanonymity`): year of birth and postal prefix generalised along
one ladder, then the quasi-identifiers of persons still in a class smaller
than ``k_anonymity`` suppressed (null); those persons keep their rows.
Diagnosis, visit reason and drug codes are quasi-identifiers too (:mod:`jobs.privacy.relink`):
generalised and suppressed until the extract meets the project's bound on
re-link risk (k^m-anonymity, on its own and against every other active
extract as published); a project that cannot meet it is not published, its
previous extract removed, and publish raises
:class:`jobs.privacy.relink.RelinkRiskExceeded` once the others are published.

A ``_manifest`` Delta table in each project folder gets one row per publish:
policy version, key fingerprint, the silver table versions read, the row
count of each extract, the publish time, what k-anonymisation did (``k``,
level reached, year band, postal characters kept, persons generalised and
suppressed, smallest class) and the re-identification risk: the share of
persons unique on the published quasi-identifiers, and on them plus their
set of diagnosis codes when the project takes diagnoses, and the re-link
risk through code sets (``relink_risk``: the bound, the code level, and the
figures before and after).

An expired or revoked project (or one no longer declared) loses its extract:
every table is emptied (DELETE), then its folder is removed with every data
and log file in it.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from functools import partial

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DateType,
    DoubleType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from jobs.core.config import Consortium, Project
from jobs.privacy.consent import consented_persons
from jobs.privacy.crypto import SparkKey, hmac_sha256_hex
from jobs.stages.gold import build_patients_by_condition
from jobs.privacy.kanonymity import k_anonymise, reidentification_risk
from jobs.privacy.keys import PseudonymKey
from jobs.core.lake import PROJECTS, Lake
from jobs.core import files
from jobs.stages.maintenance import list_folders
from jobs.privacy.policy import check_policy, shared_establishments
from jobs.privacy.relink import RelinkRiskExceeded, enforce_relink_bound, published_codes
from jobs.core.schemas import DATASETS, SILVER_SCHEMAS
from jobs.core.tables import (APPEND, cast_to, check_fingerprint, delete_where, on_each_table, overwrite_table,
                              table_exists, table_version)
from jobs.core.writer_lock import Mode, writes_lake

MANIFEST = "_manifest"
log = logging.getLogger(__name__)

# Columns that identify a person or a record: rekeyed per project.
IDENTIFIER_COLUMNS = frozenset({
    "person_id", "patient_key", "visit_occurrence_id", "condition_occurrence_id",
    "measurement_id", "drug_exposure_id", "consent_id", "observation_id",
})

PRECISION_DAY = "day"
PRECISION_MONTH = "month"
PRECISION_YEAR = "year"
PRECISION_SHIFTED = "shifted"
MAX_SHIFT_DAYS = 365

MANIFEST_SCHEMA = StructType([
    StructField("published_at", TimestampType(), False),
    StructField("on_date", DateType(), False),
    StructField("project_id", StringType(), False),
    StructField("purpose", StringType(), False),
    StructField("policy_version", StringType(), False),
    StructField("key_fingerprint", StringType(), False),
    StructField("date_precision", StringType(), False),
    StructField("silver_versions", MapType(StringType(), LongType()), False),
    StructField("row_counts", MapType(StringType(), LongType()), False),
    StructField("establishments", MapType(StringType(), ArrayType(StringType())), False),
    StructField("k_anonymity", MapType(StringType(), LongType()), True),
    StructField("reidentification_risk", MapType(StringType(), DoubleType()), True),
    # Re-link risk through code sets (jobs.privacy.relink): the bound, the code level, figures before and after.
    StructField("relink_risk", MapType(StringType(), DoubleType()), True),
])


@dataclass(frozen=True)
class PublishOutcome:
    """What one publish did: extract sizes per project and dataset, removals, gold cells."""

    on_date: dt.date
    published_at: dt.datetime
    policy_version: str
    key_fingerprint: str
    silver_versions: dict[str, int | None]
    extracts: dict[str, dict[str, int]] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    gold_cells: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # project -> why its extract was not published


# ------------------------------------------------------------ files ----

def remove_folder(spark: SparkSession, path: str) -> None:
    files.remove_tree(path)


def drop_table_physically(spark: SparkSession, path: str) -> None:
    """Empty a Delta table (a reader still holding it sees no rows), then remove its folder and every file in it.

    Removing the folder removes the data files and the log together, so no
    VACUUM is needed first: nothing is left to travel back to.
    """
    if table_exists(spark, path):
        delete_where(spark, path)
    remove_folder(spark, path)


def remove_extract(spark: SparkSession, lake: Lake, project_id: str) -> None:
    """Remove a project's extract: each table emptied, then the whole folder."""
    root = lake.project(project_id)
    for name in list_folders(spark, root):
        drop_table_physically(spark, lake.project(project_id, name))
    remove_folder(spark, root)


# ------------------------------------------------------- transforms ----

def project_pseudonym(project_key: SparkKey, col: Column | str) -> Column:
    """An identifier as the project sees it: HMAC(project_key, value)."""
    return hmac_sha256_hex(project_key, col)


def shift_days(shift_key: SparkKey, person_id: Column | str) -> Column:
    """One offset per person in [-365, -1] ∪ [1, 365], from a keyed hash of ``person_id``."""
    digest = hmac_sha256_hex(shift_key, person_id)
    bucket = F.pmod(F.conv(F.substring(digest, 1, 8), 16, 10).cast("long"), F.lit(2 * MAX_SHIFT_DAYS))
    return F.when(bucket < MAX_SHIFT_DAYS, bucket - MAX_SHIFT_DAYS).otherwise(bucket - MAX_SHIFT_DAYS + 1).cast("int")


def _date_at_precision(col: Column, data_type, precision: str, offset: Column | None) -> Column:
    if isinstance(data_type, DateType):
        if precision == PRECISION_SHIFTED:
            assert offset is not None, "a shifted date needs the person's offset"
            return F.date_add(col, offset)
        if precision in (PRECISION_MONTH, PRECISION_YEAR):
            return F.trunc(col, precision)
        return col
    if precision == PRECISION_SHIFTED:
        assert offset is not None, "a shifted timestamp needs the person's offset"
        return F.timestamp_add("DAY", offset, col)
    return F.date_trunc(precision, col)


def project_extract(silver: DataFrame, dataset: str, project: Project, establishments: list[str],
                    persons: DataFrame, project_key: SparkKey, shift_key: SparkKey) -> DataFrame:
    """One dataset of one project: allowed rows, allowed columns, project pseudonyms, coarse dates."""
    schema = {f.name: f.dataType for f in SILVER_SCHEMAS[dataset].fields}
    offset = shift_days(shift_key, F.col("person_id")) if project.date_precision == PRECISION_SHIFTED else None
    columns = []
    for name in project.datasets[dataset]:
        col, data_type = F.col(name), schema[name]
        if name in IDENTIFIER_COLUMNS:
            out = project_pseudonym(project_key, col)
        elif isinstance(data_type, (DateType, TimestampType)):
            out = _date_at_precision(col, data_type, project.date_precision, offset)
        elif name == "month_of_birth" and project.date_precision in (PRECISION_YEAR, PRECISION_SHIFTED):
            out = F.lit(None)
        else:
            out = col
        columns.append(cast_to(out, data_type).alias(name))
    return (
        silver.where(F.col("establishment_id").isin(establishments))
        .join(persons, on="person_id", how="left_semi")
        .select(*columns)
    )


# ------------------------------------------------------------ silver ----

def read_silver(spark: SparkSession, lake: Lake) -> tuple[dict[str, DataFrame], dict[str, int | None]]:
    """Every silver table pinned at its current version (empty with its schema when missing)."""
    frames: dict[str, DataFrame] = {}
    versions: dict[str, int | None] = {}
    for dataset in DATASETS:
        path = lake.silver(dataset)
        if table_exists(spark, path):
            version = table_version(spark, path)
            frames[dataset] = spark.read.format("delta").option("versionAsOf", version).load(path)
            versions[dataset] = version
        else:
            frames[dataset] = spark.createDataFrame([], SILVER_SCHEMAS[dataset])
            versions[dataset] = None
    return frames, versions


# ----------------------------------------------------------- publish ----

def read_extract(spark: SparkSession, lake: Lake, project_id: str, dataset: str) -> DataFrame:
    """One published table of a project's extract, as researchers see it."""
    return spark.read.format("delta").load(lake.project(project_id, dataset))


def _publish_project(spark: SparkSession, lake: Lake, consortium: Consortium, project: Project,
                     key: PseudonymKey, on_date: dt.date, silver: dict[str, DataFrame],
                     versions: dict[str, int | None], published_at: dt.datetime, others: list[Project]
                     ) -> dict[str, int]:
    regime = consortium.purposes[project.purpose].regime
    persons = consented_persons(spark, silver["patient"], silver["consent"], project.purpose, regime, on_date)
    persons = persons.localCheckpoint()  # computed once, used by every dataset
    project_key = SparkKey(spark, key.project_key(project.id))
    shift_key = SparkKey(spark, key.derive(f"project-date-shift:{project.id}"))
    for stale in list_folders(spark, lake.project(project.id)):
        if stale != MANIFEST and stale not in project.datasets:
            drop_table_physically(spark, lake.project(project.id, stale))
    shared: dict[str, list[str]] = {}
    extracts: dict[str, DataFrame] = {}
    anonymity = None
    for dataset in project.datasets:
        shared[dataset] = shared_establishments(consortium, project, dataset)
        extract = project_extract(silver[dataset], dataset, project, shared[dataset], persons,
                                  project_key, shift_key)
        if dataset == "patient":
            extract, anonymity = k_anonymise(extract, project.quasi_identifiers, project.k_anonymity)
        extracts[dataset] = extract
    # Code sets are quasi-identifiers too: generalised and suppressed to the project's bound, or refused.
    relink = enforce_relink_bound(spark, lake, consortium, project, extracts, anonymity, others, MANIFEST)
    # Each dataset is a table of its own: written side by side.
    counts = on_each_table({dataset: partial(overwrite_table, spark, published_codes(extract, dataset, relink),
                                             lake.project(project.id, dataset))
                            for dataset, extract in extracts.items()})
    anonymity_figures = risk = None
    if anonymity is not None:  # k-anonymised with the patient extract
        anonymity_figures = anonymity.figures()
        diagnosis = read_extract(spark, lake, project.id, "diagnosis") if "diagnosis" in project.datasets else None
        risk = reidentification_risk(read_extract(spark, lake, project.id, "patient"), project.quasi_identifiers,
                                     diagnosis)
    manifest = spark.createDataFrame([(
        published_at, on_date, project.id, project.purpose, consortium.policy_version, key.fingerprint,
        project.date_precision, {d: v for d, v in versions.items() if v is not None}, counts, shared,
        anonymity_figures, risk, relink.figures,
    )], MANIFEST_SCHEMA)
    # mergeSchema: manifests written before the k-anonymity figures existed gain the new columns.
    manifest.write.format("delta").mode(APPEND).option("mergeSchema", "true").save(
        lake.project(project.id, MANIFEST))
    return counts


@writes_lake(Mode.SHARED)
def publish(spark: SparkSession, lake: Lake, consortium: Consortium, key: PseudonymKey,
            on_date: dt.date) -> PublishOutcome:
    """Rebuild every active project's extract and the gold indicators; remove inactive extracts.

    Refuses to run (raises :class:`jobs.core.config.ConfigError` or
    :class:`jobs.privacy.policy.PolicyError`) on an invalid or changed policy, and
    :class:`jobs.privacy.keys.KeyMismatchError` when silver was written with another key.

    Example::

        outcome = publish(spark, Lake("lake"), load_consortium("config"), load_key(), clock.today())
    """
    check_policy(consortium)
    for dataset in DATASETS:
        check_fingerprint(spark, lake.silver(dataset), key.fingerprint)
    published_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    silver, versions = read_silver(spark, lake)
    gold_cells = build_patients_by_condition(spark, lake, consortium, on_date, silver=silver)
    extracts: dict[str, dict[str, int]] = {}
    removed: list[str] = []
    active = {p.id for p in consortium.projects.values() if p.is_active(on_date)}
    refused: dict[str, str] = {}
    for project_id in sorted(active):
        others = [consortium.projects[o] for o in sorted(active - {project_id} - set(refused))]
        try:
            extracts[project_id] = _publish_project(spark, lake, consortium, consortium.projects[project_id], key,
                                                    on_date, silver, versions, published_at, others)
        except RelinkRiskExceeded as exc:
            # Fail closed: the previous extract met an older bound on older data, so it goes too.
            log.error("%s", exc)
            refused[project_id] = str(exc)
            remove_extract(spark, lake, project_id)
    for project_id in list_folders(spark, lake.zone(PROJECTS)):
        if project_id not in active:
            remove_extract(spark, lake, project_id)
            removed.append(project_id)
    outcome = PublishOutcome(on_date=on_date, published_at=published_at, policy_version=consortium.policy_version,
                             key_fingerprint=key.fingerprint, silver_versions=versions, extracts=extracts,
                             removed=tuple(removed), gold_cells=gold_cells, refused=refused)
    if refused:
        raise RelinkRiskExceeded("\n".join(refused.values()), outcome)
    return outcome
