"""What each batch carries: the full first extract, then new, changed and deleted records.

Every record exists once in a *table* (its current values); each batch gets
*versions*: copies of the rows it delivers, tagged ``_change`` = ``new``,
``update`` or ``delete``. A record that received a defect is frozen: no later
batch updates or deletes it, so the ground truth never depends on how the
pipeline resolves a defective row against a later correction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from jobs.generate import names
from jobs.generate.calendar import Calendar
from jobs.generate.clinical import DECISION_PERMIT, lab_values
from jobs.generate.defects import plan_defects
from jobs.generate.people import phones_as_typed
from jobs.core.schemas import DATASETS
from jobs import reference

# What the synthetic consortium delivers: every dataset but ``observation`` (surveys, social history and
# scores come from real exports; see tests/fixtures/observation).
GENERATED_DATASETS = tuple(d for d in DATASETS if d != "observation")

UPDATE_RATE = 0.02
DELETE_RATE = 0.005
# Patients are never deleted (only facts and consents are); encounters only when nothing refers to them.
DELETABLE = frozenset({"encounter", "diagnosis", "lab_result", "medication", "consent"})

CHANGE_NEW = "new"
CHANGE_UPDATE = "update"
CHANGE_DELETE = "delete"


def _updatable(dataset: str, frame: pd.DataFrame) -> np.ndarray:
    if dataset == "patient":
        return pd.isna(frame["deceased_date"]).to_numpy()
    if dataset == "consent":
        return ((frame["decision"] == DECISION_PERMIT) & frame["valid_until"].notna()).to_numpy()
    return np.ones(len(frame), dtype=bool)


def _update(rng: np.random.Generator, dataset: str, frame: pd.DataFrame, rows: np.ndarray,
            population: pd.DataFrame) -> None:
    """Change the current values of ``rows`` (positions) in place, as a real correction would."""
    if not len(rows):
        return
    labels = frame.index[rows]
    if dataset == "patient":
        movers = rng.random(len(rows)) < 0.5
        donors = rng.integers(0, len(population), len(rows))
        for column in ("street_address", "city", "postal_code"):
            frame.loc[labels[movers], column] = population[column].to_numpy()[donors[movers]]
        area = np.array(names.AREA_CODES, dtype=object)[rng.integers(0, len(names.AREA_CODES), len(rows))]
        digits = np.array([f"{a}555{n:04d}" for a, n in zip(area.tolist(), rng.integers(0, 10000, len(rows)).tolist())],
                          dtype=object)
        frame.loc[labels[~movers], "phone"] = phones_as_typed(rng, digits[~movers])
    elif dataset == "encounter":
        due = frame.loc[labels, "visit_end"].isna().to_numpy() & (frame.loc[labels, "_due"].to_numpy())
        frame.loc[labels[due], "visit_end"] = frame.loc[labels[due], "_true_end"].to_numpy()
        others = labels[~due]
        kinds = frame.loc[others, "visit_type"].to_numpy()
        sites = [names.CARE_SITES[k][int(u * len(names.CARE_SITES[k]))] for k, u in
                 zip(kinds.tolist(), rng.random(len(others)).tolist())]
        frame.loc[others, "care_site"] = np.array(sites, dtype=object)
    elif dataset == "diagnosis":
        codes = np.array(list(reference.icd10ca()), dtype=object)
        frame.loc[labels, "condition_code"] = codes[rng.integers(0, len(codes), len(rows))]
    elif dataset == "lab_result":
        values, _ = lab_values(rng, frame.loc[labels, "loinc_code"].to_numpy(), np.zeros(len(rows), dtype=bool))
        frame.loc[labels, "value"] = values
    elif dataset == "medication":
        start = frame.loc[labels, "start_date"].to_numpy().astype("datetime64[D]")
        frame.loc[labels, "end_date"] = start + rng.integers(3, 180, len(rows)).astype("timedelta64[D]")
    elif dataset == "consent":
        until = frame.loc[labels, "valid_until"].to_numpy().astype("datetime64[D]")
        frame.loc[labels, "valid_until"] = until + np.timedelta64(365, "D")


def plan_versions(rng: np.random.Generator, tables: dict[str, pd.DataFrame], calendar: Calendar,
                  defect_rate: float, population: pd.DataFrame) -> dict[str, list[pd.DataFrame]]:
    """Rows delivered by each batch, per dataset, with their planned defect (``_defect``)."""
    versions: dict[str, list[pd.DataFrame]] = {d: [] for d in GENERATED_DATASETS}
    ends = calendar.window_ends()
    for table in tables.values():
        table["_frozen"] = False
        table["_deleted"] = False
    for batch in range(calendar.batches):
        for dataset in GENERATED_DATASETS:
            table = tables[dataset]
            created = table["_batch"].to_numpy()
            parts = [table[created == batch].assign(_change=CHANGE_NEW)]
            if batch > 0:
                alive = (created < batch) & ~table["_frozen"].to_numpy() & ~table["_deleted"].to_numpy()
                u = rng.random(len(table))
                forced = np.zeros(len(table), dtype=bool)
                if dataset == "encounter":
                    table["_due"] = table["visit_end"].isna().to_numpy() & (table["_true_end"].to_numpy() < ends[batch])
                    forced = alive & table["_due"].to_numpy()
                deletable = (dataset in DELETABLE) & table["_leaf"].to_numpy() if dataset == "encounter" \
                    else np.full(len(table), dataset in DELETABLE)
                delete = alive & ~forced & deletable & (u < DELETE_RATE)
                update = alive & ~delete & (forced | ((u > 1 - UPDATE_RATE) & _updatable(dataset, table)))
                _update(rng, dataset, table, np.flatnonzero(update), population)
                parts.append(table[update].assign(_change=CHANGE_UPDATE))
                parts.append(table[delete].assign(_change=CHANGE_DELETE))
                table.loc[delete, "_deleted"] = True
            rows = pd.concat(parts)
            rows["_defect"] = plan_defects(rng, rows, dataset, defect_rate)
            table.loc[rows.index[rows["_defect"].to_numpy() != ""], "_frozen"] = True
            versions[dataset].append(rows)
    return versions
