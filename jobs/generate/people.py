"""Synthetic persons and the establishments that know them.

A person has one true identity (names, NAM, birth date, address). Each
establishment that has seen the person holds a *link*: its own MRN, its own
record reference, and the names as its clerks typed them (an accent dropped,
upper case, a hyphen lost), so that only the NAM joins them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from jobs.generate import names
from jobs.generate.formats import nam_prefix, strip_accents

SEXES = ("female", "male", "other")
SEX_WEIGHTS = (0.51, 0.485, 0.005)

# Share of persons known to several establishments (the linkage the consortium exists for).
MULTI_ESTABLISHMENT_SHARE = 0.30
THREE_ESTABLISHMENT_SHARE = 0.30  # of the multi-establishment persons
NEW_PERSON_SHARE_PER_BATCH = 0.01
LATE_LINK_SHARE = 0.05
REGISTRATION_ONLY_SHARE = 0.08
NAME_VARIANT_SHARE = 0.6
TAILS = 90  # administrative digits 10..99 of a NAM


class GenerationError(ValueError):
    """The generator was asked for something it cannot produce."""


def _zipf_weights(n: int, exponent: float = 0.8) -> np.ndarray:
    weights = 1.0 / (np.arange(n) + 5.0) ** exponent
    return weights / weights.sum()


def make_population(rng: np.random.Generator, count: int, as_of: np.datetime64) -> pd.DataFrame:
    """``count`` persons with their true identity, one row each (index = person number)."""
    sex = np.array(SEXES, dtype=object)[rng.choice(len(SEXES), size=count, p=SEX_WEIGHTS)]
    # Ages outside 40 days .. 100 years are drawn again uniformly inside it: clipping them would pile
    # thousands of persons onto the same two birth dates (and exhaust their NAMs' administrative digits).
    low, high = 40, int(100 * 365.25)
    age_days = (rng.gamma(2.2, 22.0, size=count) * 365.25).astype("int64")
    outside = (age_days < low) | (age_days > high)
    age_days[outside] = rng.integers(low, high, size=int(outside.sum()))
    birth = as_of.astype("datetime64[D]") - age_days.astype("timedelta64[D]")

    family_pool = np.array(names.FAMILY_NAMES, dtype=object)
    family = family_pool[rng.choice(len(family_pool), size=count, p=_zipf_weights(len(family_pool)))]
    female_pool = np.array(names.GIVEN_NAMES_FEMALE, dtype=object)
    male_pool = np.array(names.GIVEN_NAMES_MALE, dtype=object)
    given_f = female_pool[rng.choice(len(female_pool), size=count, p=_zipf_weights(len(female_pool), 0.5))]
    given_m = male_pool[rng.choice(len(male_pool), size=count, p=_zipf_weights(len(male_pool), 0.5))]
    other_pick = rng.random(count) < 0.5
    given = np.where((sex == "female") | ((sex == "other") & other_pick), given_f, given_m)

    nam = _nams(rng, family, given, birth, sex)

    city_index = rng.integers(0, len(names.CITIES), size=count)
    city = np.array([c for c, _ in names.CITIES], dtype=object)[city_index]
    fsa_sizes = np.array([len(f) for _, f in names.CITIES])[city_index]
    fsa_pick = (rng.random(count) * fsa_sizes).astype(int)
    letters = np.array(list(names.POSTAL_LETTERS), dtype=object)
    ldu_d1 = rng.integers(0, 10, size=count)
    ldu_l = letters[rng.integers(0, len(letters), size=count)]
    ldu_d2 = rng.integers(0, 10, size=count)
    postal = np.array([f"{names.CITIES[c][1][f]} {a}{b}{d}" for c, f, a, b, d in
                       zip(city_index.tolist(), fsa_pick.tolist(), ldu_d1.tolist(), ldu_l.tolist(),
                           ldu_d2.tolist())], dtype=object)
    number = rng.integers(1, 9999, size=count)
    street = np.array(names.STREET_NAMES, dtype=object)[rng.integers(0, len(names.STREET_NAMES), size=count)]
    apartment = rng.integers(1, 40, size=count)
    has_apartment = rng.random(count) < 0.2
    address = np.array([f"{n} {s}, app. {a}" if h else f"{n} {s}" for n, s, a, h in
                        zip(number.tolist(), street.tolist(), apartment.tolist(), has_apartment.tolist())],
                       dtype=object)

    area = np.array(names.AREA_CODES, dtype=object)[rng.integers(0, len(names.AREA_CODES), size=count)]
    line = rng.integers(0, 10000, size=count)
    phone = np.array([f"{a}555{n:04d}" for a, n in zip(area.tolist(), line.tolist())], dtype=object)

    domain = np.array(names.EMAIL_DOMAINS, dtype=object)[rng.integers(0, len(names.EMAIL_DOMAINS), size=count)]
    suffix = rng.integers(1, 99, size=count)
    has_email = rng.random(count) < 0.7
    email = np.array([_email(g, f, s, d) if h else "" for g, f, s, d, h in
                      zip(given.tolist(), family.tolist(), suffix.tolist(), domain.tolist(), has_email.tolist())],
                     dtype=object)

    return pd.DataFrame({
        "sex": sex, "birth_date": birth, "family_name": family, "given_name": given, "nam": nam,
        "street_address": address, "city": city, "postal_code": postal, "phone": phone, "email": email,
    })


def _email(given: str, family: str, suffix: int, domain: str) -> str:
    def clean(text: str) -> str:
        return "".join(c for c in strip_accents(text).lower() if c.isalnum() or c == "-")
    return f"{clean(given)}.{clean(family)}{suffix}@{domain}"


def _nams(rng: np.random.Generator, family: np.ndarray, given: np.ndarray, birth: np.ndarray,
          sex: np.ndarray) -> np.ndarray:
    """Unique, valid NAMs: letters, YY, MM (+50 for women), DD and two administrative digits."""
    years = birth.astype("datetime64[Y]").astype(int) + 1970
    months = birth.astype("datetime64[M]").astype(int) % 12 + 1
    days = (birth - birth.astype("datetime64[M]").astype("datetime64[D]")).astype(int) + 1
    months = np.where(sex == "female", months + 50, months)
    stems = np.array([f"{nam_prefix(f, g)}{y % 100:02d}{m:02d}{d:02d}" for f, g, y, m, d in
                      zip(family.tolist(), given.tolist(), years.tolist(), months.tolist(), days.tolist())],
                     dtype=object)
    tails = rng.integers(10, 100, size=len(stems))
    # Homonyms born the same day get distinct administrative digits, as RAMQ does.
    order = np.lexsort((tails, stems))
    seen: dict[str, set[int]] = {}
    for i in order.tolist():
        used = seen.setdefault(stems[i], set())
        tail = int(tails[i])
        if len(used) == TAILS:
            raise GenerationError(f"more than {TAILS} persons share the NAM stem {stems[i]}: their administrative "
                                  "digits run out. Widen the name pools or the birth dates.")
        while tail in used:
            tail = 10 + (tail - 9) % TAILS
        used.add(tail)
        tails[i] = tail
    return np.array([f"{s}{t:02d}" for s, t in zip(stems.tolist(), tails.tolist())], dtype=object)


def make_links(rng: np.random.Generator, population: pd.DataFrame, establishments: int,
               batches: int) -> pd.DataFrame:
    """Which establishments know which person, from which batch on.

    Exactly ``ceil(30%)`` of the persons are known to two or more establishments
    (when there are several), so linkage is always exercised.
    """
    count = len(population)
    per_person = np.ones(count, dtype=int)
    if establishments >= 2:
        multi = rng.permutation(count)[: math.ceil(MULTI_ESTABLISHMENT_SHARE * count)]
        per_person[multi] = 2
        if establishments >= 3:
            three = multi[rng.random(len(multi)) < THREE_ESTABLISHMENT_SHARE]
            per_person[three] = 3
    choice = np.argsort(rng.random((count, establishments)), axis=1)
    person = np.repeat(np.arange(count), per_person)
    rank = np.arange(len(person)) - np.repeat(np.cumsum(per_person) - per_person, per_person)
    est = choice[person, rank]

    first_batch = np.zeros(count, dtype=int)
    if batches > 1:
        for batch in range(1, batches):
            arrivals = (first_batch == 0) & (rng.random(count) < NEW_PERSON_SHARE_PER_BATCH)
            first_batch[arrivals] = batch
    created = first_batch[person].copy()
    if batches > 1:
        late = (rank > 0) & (rng.random(len(person)) < LATE_LINK_SHARE)
        created[late] = np.maximum(created[late], rng.integers(1, batches, size=int(late.sum())))

    links = pd.DataFrame({"_person": person, "_est": est, "_rank": rank, "_batch": created})
    links["_registration_only"] = rng.random(len(links)) < REGISTRATION_ONLY_SHARE
    return links.sort_values(["_est", "_batch", "_person"], kind="stable").reset_index(drop=True)


# ------------------------------------------------------- how clerks type ----

def _variant(rng: np.random.Generator, text: str) -> str:
    variants = [text.upper(), text.lower().capitalize() if text.isupper() else text.upper()]
    if strip_accents(text) != text:
        variants += [strip_accents(text)] * 2
    if "-" in text:
        variants += [text.replace("-", " "), text.replace("-", "")]
    return variants[int(rng.integers(0, len(variants)))]


def names_as_typed(rng: np.random.Generator, links: pd.DataFrame, population: pd.DataFrame) -> pd.DataFrame:
    """Names per link: the primary establishment has them right, others sometimes differ slightly."""
    family = population["family_name"].to_numpy()[links["_person"].to_numpy()].copy()
    given = population["given_name"].to_numpy()[links["_person"].to_numpy()].copy()
    secondary = links["_rank"].to_numpy() > 0
    vary = secondary & (rng.random(len(links)) < NAME_VARIANT_SHARE)
    on_family = rng.random(len(links)) < 0.5
    for i in np.flatnonzero(vary).tolist():
        if on_family[i]:
            family[i] = _variant(rng, family[i])
        else:
            given[i] = _variant(rng, given[i])
    return pd.DataFrame({"family_name": family, "given_name": given}, index=links.index)


PHONE_STYLES = ("{a}-{b}-{c}", "({a}) {b}-{c}", "{a}{b}{c}", "+1 {a} {b} {c}")


def phones_as_typed(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    style = rng.integers(0, len(PHONE_STYLES), size=len(digits))
    return np.array([PHONE_STYLES[s].format(a=d[:3], b=d[3:6], c=d[6:]) for d, s in
                     zip(digits.tolist(), style.tolist())], dtype=object)
