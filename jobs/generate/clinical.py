"""Encounters, diagnoses, lab results, medications and consent decisions.

Everything is drawn with numpy over whole arrays; only consent decisions, a
few per person, are drawn in a loop. Codes come from ``jobs.reference`` and
correlate with each person's chronic conditions (a diabetic gets HbA1c tests
and metformin more often than chance).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from jobs import reference
from jobs.generate import names
from jobs.generate.calendar import Calendar
from jobs.generate.formats import NAT_DAY, NAT_MINUTE

VISIT_TYPES = ("inpatient", "outpatient", "emergency")
VISIT_WEIGHTS = (0.2, 0.55, 0.25)
DIAGNOSIS_PRINCIPAL = "principal"
DIAGNOSIS_SECONDARY = "secondary"

CHRONIC_GROUPS = ("diabetes", "hypertension", "dyslipidemia", "cardiac", "respiratory", "oncology", "renal",
                  "mental_health")
CHRONIC_BASE_RATE = (0.12, 0.22, 0.15, 0.08, 0.10, 0.06, 0.05, 0.10)
FAVOURED_LABS = {
    "diabetes": ("4548-4", "14749-6"),
    "hypertension": ("2823-3", "2951-2", "14682-9"),
    "dyslipidemia": ("22748-8", "14647-2", "14646-4", "14927-8"),
    "cardiac": ("89579-7", "2823-3"),
    "respiratory": ("6690-2", "1988-5"),
    "oncology": ("718-7", "6690-2", "777-3"),
    "renal": ("14682-9", "33914-3", "2823-3"),
    "mental_health": ("3016-3",),
}
FAVOURED_ATC_PREFIXES = {
    "diabetes": ("A10",), "hypertension": ("C09", "C08", "C03"), "dyslipidemia": ("C10",),
    "cardiac": ("B01", "C07"), "respiratory": ("R03",), "oncology": ("L01", "L02"), "renal": ("C03",),
    "mental_health": ("N06",),
}
# Usual single doses of the ATC substances (DIN products carry their strength in their name).
ATC_DOSES = {
    "A10BA02": (500, 850, 1000), "A10AE04": (10, 20, 30), "A10BK01": (5, 10), "C09AA05": (2.5, 5, 10),
    "C08CA01": (5, 10), "C03CA01": (20, 40, 80), "C07AB02": (25, 50, 100), "C10AA05": (10, 20, 40, 80),
    "C10AA07": (5, 10, 20), "B01AC06": (80, 81), "B01AF02": (2.5, 5), "N02BE01": (500, 650, 1000),
    "N02AA01": (2.5, 5, 10), "J01CA04": (250, 500), "J01DD04": (1, 2), "R03AC02": (100, 200),
    "R03BA02": (200, 400), "H03AA01": (25, 50, 75, 100), "A02BC01": (20, 40), "L02BA01": (20,),
    "L01BC06": (500, 1000), "L01XA01": (50, 75, 100), "N06AB06": (25, 50, 100),
}


def _draw_from_groups(rng: np.random.Generator, person_groups: np.ndarray, persons: np.ndarray,
                      share: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row, one of its person's chronic groups (or -1) and whether to use it."""
    mask = person_groups[persons]
    keys = rng.random(mask.shape) * mask
    group = np.argmax(keys, axis=1)
    use = mask.any(axis=1) & (rng.random(len(persons)) < share)
    return np.where(use, group, -1), use


def chronic_groups(rng: np.random.Generator, population: pd.DataFrame, as_of: np.datetime64) -> np.ndarray:
    """Person x chronic group booleans; older persons carry more conditions."""
    birth = population["birth_date"].to_numpy().astype("datetime64[D]")
    age = (as_of.astype("datetime64[D]") - birth).astype(int) / 365.25
    factor = np.clip(age / 60.0, 0.05, 1.6)
    base = np.array(CHRONIC_BASE_RATE)
    return rng.random((len(population), len(base))) < base[None, :] * factor[:, None]


def choose_deceased(rng: np.random.Generator, links: pd.DataFrame, population: pd.DataFrame) -> np.ndarray:
    """Candidates for a death before the first extract: old persons whose links all exist from batch 0."""
    late = np.zeros(len(population), dtype=bool)
    late[links.loc[links["_batch"] > 0, "_person"].to_numpy()] = True
    old = population["birth_date"].to_numpy() < np.datetime64("1950-01-01")
    return old & ~late & (rng.random(len(population)) < 0.06)


def make_encounters(rng: np.random.Generator, links: pd.DataFrame, population: pd.DataFrame,
                    calendar: Calendar, deceased: np.ndarray) -> pd.DataFrame:
    """Encounters of every link, batch by batch (historical for batch 0, then a week at a time)."""
    clinical = ~links["_registration_only"].to_numpy()
    created = links["_batch"].to_numpy()
    dead = deceased[links["_person"].to_numpy()]
    parts_link, parts_batch = [], []
    for batch_number in range(calendar.batches):
        if batch_number == 0:
            n = np.where(clinical & (created == 0), 1 + rng.poisson(2.2, len(links)), 0)
        else:
            n = (np.where(clinical & (created < batch_number) & ~dead, rng.poisson(0.05, len(links)), 0)
                 + np.where(clinical & (created == batch_number), 1 + rng.poisson(0.5, len(links)), 0))
        parts_link.append(np.repeat(np.arange(len(links)), n))
        parts_batch.append(np.full(int(n.sum()), batch_number))
    link = np.concatenate(parts_link)
    batch = np.concatenate(parts_batch)
    count = len(link)

    starts, ends = calendar.window_starts()[batch], calendar.window_ends()[batch]
    person = links["_person"].to_numpy()[link]
    birth = population["birth_date"].to_numpy().astype("datetime64[D]")[person].astype("datetime64[m]")
    lo = np.maximum(starts, birth + np.timedelta64(1, "D"))
    lo_day = lo.astype("datetime64[D]")
    span_days = (ends.astype("datetime64[D]") - lo_day).astype(int)
    day = lo_day + (rng.random(count) * np.maximum(span_days, 1)).astype(int).astype("timedelta64[D]")

    visit_type = np.array(VISIT_TYPES, dtype=object)[rng.choice(3, size=count, p=VISIT_WEIGHTS)]
    outpatient = visit_type == "outpatient"
    inpatient = visit_type == "inpatient"
    minute_of_day = np.where(outpatient, rng.integers(8 * 60, 16 * 60 + 30, count) // 5 * 5,
                             rng.integers(0, 24 * 60, count))
    start = day.astype("datetime64[m]") + minute_of_day.astype("timedelta64[m]")
    start = np.maximum(start, lo)
    duration = np.where(
        outpatient, rng.integers(15, 120, count),
        np.where(inpatient, (1 + rng.exponential(4.0, count)).clip(1, 60) * 1440,
                 np.exp(rng.normal(np.log(360), 0.6, count)).clip(60, 2880))).astype("int64")
    true_end = start + duration.astype("timedelta64[m]")
    visible_end = np.where(true_end < ends, true_end, NAT_MINUTE)

    sites = np.empty(count, dtype=object)
    for kind, pool in names.CARE_SITES.items():
        rows = np.flatnonzero(visit_type == kind)
        sites[rows] = np.array(pool, dtype=object)[rng.integers(0, len(pool), len(rows))]

    frame = pd.DataFrame({
        "_link": link, "_person": person, "_est": links["_est"].to_numpy()[link], "_batch": batch,
        "visit_start": start, "visit_end": visible_end, "_true_end": true_end, "visit_type": visit_type,
        "care_site": sites,
    })
    return frame.sort_values(["_est", "_batch", "visit_start", "_link"], kind="stable").reset_index(drop=True)


def admission_notes(rng: np.random.Generator, encounters: pd.DataFrame, links: pd.DataFrame,
                    population: pd.DataFrame) -> np.ndarray:
    """Free text naming the patient: it must never leave bronze."""
    count = len(encounters)
    link = encounters["_link"].to_numpy()
    person = encounters["_person"].to_numpy()
    family = links["family_name"].to_numpy()[link]
    given = links["given_name"].to_numpy()[link]
    street = population["street_address"].to_numpy()[person]
    female = population["sex"].to_numpy()[person] == "female"
    birth = population["birth_date"].to_numpy().astype("datetime64[D]")[person]
    age = ((encounters["visit_start"].to_numpy().astype("datetime64[D]") - birth).astype(int) // 365.25).astype(int)
    template_pick = rng.random(count)
    reason = np.array(names.REASONS, dtype=object)[rng.integers(0, len(names.REASONS), count)]
    doctor = np.array(names.DOCTORS, dtype=object)[rng.integers(0, len(names.DOCTORS), count)]
    notes = np.empty(count, dtype=object)
    for i, (kind, f, g, s, fem, a, t, r, d) in enumerate(zip(
            encounters["visit_type"].tolist(), family.tolist(), given.tolist(), street.tolist(), female.tolist(),
            age.tolist(), template_pick.tolist(), reason.tolist(), doctor.tolist())):
        templates = names.ADMISSION_NOTES[kind]
        notes[i] = templates[int(t * len(templates))].format(
            title="Mme" if fem else "M.", given=g, family=f, age=a, e="e" if fem else "", reason=r, doctor=d,
            street=s)
    return notes


def _expand(rng: np.random.Generator, encounters: pd.DataFrame, means: dict[str, float],
            at_least_one: frozenset[str] = frozenset()) -> np.ndarray:
    visit_type = encounters["visit_type"].to_numpy()
    counts = np.zeros(len(encounters), dtype=int)
    for kind, mean in means.items():
        rows = visit_type == kind
        counts[rows] = rng.poisson(mean, int(rows.sum())) + (1 if kind in at_least_one else 0)
    return np.repeat(np.arange(len(encounters)), counts)


def _fact_frame(encounters: pd.DataFrame, enc: np.ndarray) -> dict[str, np.ndarray]:
    return {"_enc": enc, "_link": encounters["_link"].to_numpy()[enc], "_person": encounters["_person"].to_numpy()[enc],
            "_est": encounters["_est"].to_numpy()[enc], "_batch": encounters["_batch"].to_numpy()[enc]}


def make_diagnoses(rng: np.random.Generator, encounters: pd.DataFrame, groups: np.ndarray) -> pd.DataFrame:
    enc = _expand(rng, encounters, {"inpatient": 1.5, "emergency": 0.9, "outpatient": 0.6},
                  at_least_one=frozenset({"inpatient"}))
    facts = _fact_frame(encounters, enc)
    catalogue = reference.icd10ca()
    all_codes = np.array(list(catalogue), dtype=object)
    by_group = {g: np.array([c for c, d in catalogue.items() if d.condition_group == g], dtype=object)
                for g in CHRONIC_GROUPS}
    group, use = _draw_from_groups(rng, groups, facts["_person"], 0.65)
    code = all_codes[rng.integers(0, len(all_codes), len(enc))]
    pick = rng.random(len(enc))
    for g_index, g in enumerate(CHRONIC_GROUPS):
        rows = use & (group == g_index)
        pool = by_group[g]
        code[rows] = pool[(pick[rows] * len(pool)).astype(int)]
    first = np.r_[True, enc[1:] != enc[:-1]] if len(enc) else np.zeros(0, dtype=bool)
    return pd.DataFrame({
        **facts,
        "condition_code": code, "condition_system": reference.SYSTEM_ICD10CA,
        "condition_date": encounters["visit_start"].to_numpy()[enc].astype("datetime64[D]"),
        "diagnosis_type": np.where(first, DIAGNOSIS_PRINCIPAL, DIAGNOSIS_SECONDARY).astype(object),
    })


def lab_values(rng: np.random.Generator, codes: np.ndarray, abnormal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plausible values (abnormal ones beyond the typical range, never beyond plausible) and their decimals."""
    catalogue = reference.loinc()
    values = np.zeros(len(codes))
    decimals = np.zeros(len(codes), dtype=int)
    u = rng.random(len(codes))
    high = rng.random(len(codes)) < 0.7
    for code, test in catalogue.items():
        rows = codes == code
        if not rows.any():
            continue
        normal = test.typical_low + u[rows] * (test.typical_high - test.typical_low)
        above = test.typical_high + u[rows] * (test.plausible_high - test.typical_high) * 0.15
        below = test.plausible_low + (test.typical_low - test.plausible_low) * (0.5 + 0.5 * u[rows])
        value = np.where(abnormal[rows], np.where(high[rows], above, below), normal)
        value = np.clip(np.round(value, test.decimals), test.plausible_low, test.plausible_high)
        values[rows] = value
        decimals[rows] = test.decimals
    return values, decimals


def make_lab_results(rng: np.random.Generator, encounters: pd.DataFrame, groups: np.ndarray,
                     calendar: Calendar) -> pd.DataFrame:
    enc = _expand(rng, encounters, {"inpatient": 4.0, "emergency": 2.5, "outpatient": 1.2})
    facts = _fact_frame(encounters, enc)
    catalogue = reference.loinc()
    all_codes = np.array(list(catalogue), dtype=object)
    code = all_codes[rng.integers(0, len(all_codes), len(enc))]
    group, use = _draw_from_groups(rng, groups, facts["_person"], 0.5)
    pick = rng.random(len(enc))
    for g_index, g in enumerate(CHRONIC_GROUPS):
        rows = use & (group == g_index)
        pool = np.array(FAVOURED_LABS[g], dtype=object)
        code[rows] = pool[(pick[rows] * len(pool)).astype(int)]
    abnormal = rng.random(len(enc)) < np.where(use, 0.6, 0.12)
    value, decimals = lab_values(rng, code, abnormal)

    start = encounters["visit_start"].to_numpy().astype("datetime64[m]")[enc]
    end = encounters["_true_end"].to_numpy().astype("datetime64[m]")[enc]
    limit = calendar.window_ends()[facts["_batch"]] - np.timedelta64(1, "m")
    latest = np.minimum(np.minimum(end, limit), start + np.timedelta64(3, "D"))
    span = (latest - start).astype(int)
    measured = start + (rng.random(len(enc)) * np.maximum(span, 0)).astype(int).astype("timedelta64[m]")
    return pd.DataFrame({
        **facts, "loinc_code": code, "value": value, "_decimals": decimals,
        "unit": np.array([catalogue[c].unit for c in code.tolist()], dtype=object), "measured_at": measured,
    })


def make_medications(rng: np.random.Generator, encounters: pd.DataFrame, groups: np.ndarray) -> pd.DataFrame:
    enc = _expand(rng, encounters, {"inpatient": 2.0, "emergency": 0.7, "outpatient": 0.6})
    facts = _fact_frame(encounters, enc)
    catalogue = reference.drugs()
    all_codes = np.array(list(catalogue), dtype=object)
    code = all_codes[rng.integers(0, len(all_codes), len(enc))]
    group, use = _draw_from_groups(rng, groups, facts["_person"], 0.6)
    pick = rng.random(len(enc))
    for g_index, g in enumerate(CHRONIC_GROUPS):
        rows = use & (group == g_index)
        pool = np.array([c for c, d in catalogue.items() if d.system == reference.SYSTEM_ATC
                         and c.startswith(FAVOURED_ATC_PREFIXES[g])], dtype=object)
        code[rows] = pool[(pick[rows] * len(pool)).astype(int)]
    drugs = [catalogue[c] for c in code.tolist()]
    dose_pick = rng.random(len(enc))
    dose = np.array([_dose(d, p) for d, p in zip(drugs, dose_pick.tolist())], dtype=float)

    start = encounters["visit_start"].to_numpy()[enc].astype("datetime64[D]")
    days = rng.integers(3, 120, len(enc)).astype("timedelta64[D]")
    open_ended = rng.random(len(enc)) < 0.3
    return pd.DataFrame({
        **facts, "drug_code": code, "drug_system": np.array([d.system for d in drugs], dtype=object),
        "start_date": start, "end_date": np.where(open_ended, NAT_DAY, start + days),
        "dose": dose, "dose_unit": np.array([d.dose_unit for d in drugs], dtype=object),
        "route": np.array([d.route for d in drugs], dtype=object),
    })


def _dose(drug: reference.Drug, pick: float) -> float:
    if drug.code in ATC_DOSES:
        options = ATC_DOSES[drug.code]
        return float(options[int(pick * len(options))])
    strength = next((float(w) for w in drug.display.split() if w.replace(".", "", 1).isdigit()), 1.0)
    return strength * (2.0 if pick > 0.8 else 1.0)


# -------------------------------------------------------------- consents ----

DECISION_PERMIT = "permit"
DECISION_DENY = "deny"
DECISION_WITHDRAW = "withdraw"
CONSENT_VALIDITY_YEARS = 5


def make_consents(rng: np.random.Generator, links: pd.DataFrame, population: pd.DataFrame,
                  calendar: Calendar, purposes: list[tuple[str, str]], writable: dict[int, set[str]],
                  deceased: np.ndarray) -> pd.DataFrame:
    """Consent decisions over time and across establishments.

    Opt-out purposes mostly collect objections, opt-in purposes mostly
    agreements; in later batches some persons withdraw (possibly at another
    establishment than the one that recorded their agreement) and some decide
    anew. Decision dates of one person and purpose never coincide, so the
    most recent decision is always well defined.
    """
    clinical = ~links["_registration_only"].to_numpy()
    person_of = links["_person"].to_numpy()
    est_of = links["_est"].to_numpy()
    created = links["_batch"].to_numpy()
    eligible = clinical & ~deceased[person_of]
    has_history = eligible & (rng.random(len(links)) < 0.45)
    birth = population["birth_date"].to_numpy().astype("datetime64[D]")
    starts, ends = calendar.window_starts(), calendar.window_ends()

    rows: list[tuple] = []
    used: dict[tuple[int, str], set] = {}
    permits: dict[tuple[int, str], int] = {}
    links_of: dict[int, list[int]] = {}
    for i in np.flatnonzero(eligible).tolist():
        links_of.setdefault(int(person_of[i]), []).append(i)

    def add(link: int, purpose: str, decision: str, batch: int) -> None:
        person = int(person_of[link])
        lo = max(starts[batch].astype("datetime64[D]"), birth[person] + np.timedelta64(1, "D"))
        hi = ends[batch].astype("datetime64[D]") - np.timedelta64(1, "D")
        span = max(int((hi - lo).astype(int)), 1)
        day = lo + np.timedelta64(int(rng.integers(0, span)), "D")
        taken = used.setdefault((person, purpose), set())
        while day in taken:
            day = day + np.timedelta64(1, "D") if day < hi else lo + np.timedelta64(int(rng.integers(0, span)), "D")
        taken.add(day)
        until = (np.datetime64(f"{int(str(day)[:4]) + CONSENT_VALIDITY_YEARS}{str(day)[4:]}")
                 if decision == DECISION_PERMIT and str(day)[5:] != "02-29" else NAT_DAY)
        rows.append((link, person, int(est_of[link]), batch, purpose, decision, day, day, until))
        if decision == DECISION_PERMIT:
            permits[(person, purpose)] = link

    for link in np.flatnonzero(has_history).tolist():
        for purpose, regime in purposes:
            if purpose not in writable[int(est_of[link])]:
                continue
            if regime == "opt_out":
                if rng.random() < 0.3:
                    add(link, purpose, DECISION_DENY if rng.random() < 0.7 else DECISION_PERMIT, int(created[link]))
            elif rng.random() < 0.4:
                add(link, purpose, DECISION_PERMIT if rng.random() < 0.65 else DECISION_DENY, int(created[link]))

    for batch in range(1, calendar.batches):
        for person, purpose in sorted(permits):
            if rng.random() < 0.05:
                del permits[(person, purpose)]
                candidates = [i for i in links_of.get(person, []) if created[i] <= batch
                              and purpose in writable[int(est_of[i])]]
                if candidates:
                    add(candidates[int(rng.integers(0, len(candidates)))], purpose, DECISION_WITHDRAW, batch)
        for link in np.flatnonzero(eligible & (created < batch) & (rng.random(len(links)) < 0.01)).tolist():
            options = [p for p in purposes if p[0] in writable[int(est_of[link])]]
            if options:
                purpose, regime = options[int(rng.integers(0, len(options)))]
                decision = DECISION_DENY if (regime == "opt_out") == (rng.random() < 0.7) else DECISION_PERMIT
                add(link, purpose, decision, batch)

    columns = ["_link", "_person", "_est", "_batch", "purpose", "decision", "decision_date", "valid_from",
               "valid_until"]
    frame = pd.DataFrame(rows, columns=columns)
    for column in ("decision_date", "valid_from", "valid_until"):
        frame[column] = frame[column].to_numpy(dtype="datetime64[D]") if len(frame) else np.array([], "datetime64[D]")
    order = ["_est", "_batch", "decision_date", "_link", "purpose"]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)
