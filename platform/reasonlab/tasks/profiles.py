"""Synthetic people and the one-hop and two-hop questions about them (capacity_and_grokking.md §1).

N profiles, each with a unique full name (first, middle, last), a birth date, a birth city, a
university, an employer and R relations to other people drawn uniformly. Value pools come from
Faker's locale lists (names: en_US; cities: en_IN; universities: "University of" an it_IT city;
employers: an en_US surname and a company suffix), cut to fixed sizes so every formula knows them.
The profile set is a pure function of (N, R, seed) and the pool sizes.

Questions follow EleutherAI's templates: "What was {name}'s {subject}?" and
"What was {name}'s {relation}'s {subject}?", where a subject is an attribute or a relation. Held-out
two-hop sets follow their design (§1.3): held-out first people, first-hop relations, (person,
relation) pairs, bridge people, second-hop subjects, (bridge, subject) pairs, and complete tuples.
None of them is ever drawn for training; one-hop facts are all trained.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from reasonlab.errors import ConfigError
from reasonlab.tasks.base import Example, Task, counter_hash

ATTRIBUTES = ("birth_date", "birth_city", "university", "employer")
RELATIONS = ("parent", "child", "best_friend", "worst_enemy", "sibling", "spouse", "cousin", "grandparent",
             "grandchild", "business_partner", "protege", "mentor", "betrayer", "debtor", "blackmailer", "hero",
             "evil_twin")
YEARS, MONTHS, DAYS = 200, 12, 28  # 1900-2099, every month, days 1-28: a uniform date, no day-28 pile-up
DATE_SUPPORT = YEARS * MONTHS * DAYS
PROFILES_FILE = "profiles.parquet"
# the held-out two-hop categories, in the order tuples are assigned to them
HELDOUT_SETS = ("first_people", "relations", "person_relation_pairs", "second_people", "second_subjects",
                "second_person_subject_pairs", "complete_tuples")


@dataclass
class ProfilesParams:
    name: str = "profiles_qa"
    num_profiles: int = 1000
    relations: int = 4  # the first R of the 17 relation kinds
    seed: int = 0  # fixes the profiles, the held-out sets and the question stream
    two_hop_fraction: float = 0.0  # share of training questions that are two-hop
    heldout_fraction: float = 0.02  # size of each held-out two-hop set but the last, as a fraction
    heldout_tuple_fraction: float = 0.1  # complete (person, relation, subject) tuples held out
    eval_questions: int = 500  # questions per evaluation set
    capacity_questions: int = 200_000  # answer losses measured per hop count (all facts if fewer)
    first_names: int = 400  # pool sizes (Allen-Zhu & Li's bioS: 400 × 400 × 1000 names)
    middle_names: int = 400
    last_names: int = 1000
    cities: int = 200
    universities: int = 300
    employers: int = 263
    vocab_size: int = 3000  # byte-level BPE trained on the one-hop questions

    def check(self) -> None:
        if self.num_profiles < 2:
            raise ConfigError(f"task.num_profiles: expected at least 2, got {self.num_profiles}")
        if not 1 <= self.relations <= len(RELATIONS):
            raise ConfigError(f"task.relations: expected 1 to {len(RELATIONS)}, got {self.relations}")
        for key in ("two_hop_fraction", "heldout_fraction", "heldout_tuple_fraction"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"task.{key}: expected a value in [0, 1], got {getattr(self, key)}")
        for key in ("eval_questions", "capacity_questions"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.{key}: expected a value > 0, got {getattr(self, key)}")
        limits = pool_limits()
        for key, limit in limits.items():
            if not 1 <= getattr(self, key) <= limit:
                raise ConfigError(f"task.{key}: the pool holds 1 to {limit} values, got {getattr(self, key)}")
        space = self.first_names * self.middle_names * self.last_names
        if self.num_profiles > space // 2:
            raise ConfigError(f"task.num_profiles: {self.num_profiles} unique names need a name space of at least "
                              f"twice that; the pools give {space}")
        if self.vocab_size < 300:
            raise ConfigError(f"task.vocab_size: expected at least 300 (256 bytes + merges), got {self.vocab_size}")


# ----------------------------------------------------------------------------------------------------
# Value pools


@functools.cache
def _faker_lists() -> dict[str, list[str]]:
    from faker.providers.address.en_IN import Provider as IndianAddress
    from faker.providers.address.it_IT import Provider as ItalianAddress
    from faker.providers.company.en_US import Provider as Company
    from faker.providers.person.en_US import Provider as Person

    def ascii_unique(values) -> list[str]:
        return sorted({v for v in values if v.isascii() and "'" not in v})

    last = ascii_unique(Person.last_names)
    return {
        "first": ascii_unique(Person.first_names),
        "last": last,
        "city": ascii_unique(IndianAddress.cities),
        "university": [f"University of {c}" for c in ascii_unique(ItalianAddress.cities)],
        "employer": [f"{name} {suffix}" for name in last for suffix in Company.company_suffixes],
    }


def pool_limits() -> dict[str, int]:
    lists = _faker_lists()
    return {"first_names": len(lists["first"]), "middle_names": len(lists["first"]),
            "last_names": len(lists["last"]), "cities": len(lists["city"]),
            "universities": len(lists["university"]), "employers": len(lists["employer"])}


def _pick(values: list[str], k: int, stream: int) -> list[str]:
    """k values in a fixed pseudo-random order (one order per pool, independent of the task seed)."""
    keys = counter_hash(stream, "train", np.arange(len(values), dtype=np.uint64))
    return [values[i] for i in np.argsort(keys, kind="stable")[:k]]


@dataclass(frozen=True)
class Pools:
    first: list[str]
    middle: list[str]
    last: list[str]
    city: list[str]
    university: list[str]
    employer: list[str]


def make_pools(p: ProfilesParams) -> Pools:
    lists = _faker_lists()
    return Pools(first=_pick(lists["first"], p.first_names, 1), middle=_pick(lists["first"], p.middle_names, 2),
                 last=_pick(lists["last"], p.last_names, 3), city=_pick(lists["city"], p.cities, 4),
                 university=_pick(lists["university"], p.universities, 5),
                 employer=_pick(lists["employer"], p.employers, 6))


# ----------------------------------------------------------------------------------------------------
# Profiles


@dataclass(frozen=True)
class Profiles:
    """Column arrays of N people: indices into the pools, and relation targets (N × R)."""
    pools: Pools
    first: np.ndarray
    middle: np.ndarray
    last: np.ndarray
    year: np.ndarray  # 0..199 → 1900..2099
    month: np.ndarray  # 0..11
    day: np.ndarray  # 0..27
    city: np.ndarray
    university: np.ndarray
    employer: np.ndarray
    relations: np.ndarray  # relations[p, r] = the person p's r-th relation points to

    @property
    def size(self) -> int:
        return len(self.first)

    @functools.cached_property
    def names(self) -> list[str]:
        f, m, l = self.pools.first, self.pools.middle, self.pools.last
        return [f"{f[a]} {m[b]} {l[c]}" for a, b, c in zip(self.first, self.middle, self.last)]

    @functools.cached_property
    def attribute_values(self) -> dict[str, list[str]]:
        dates = [f"{1900 + y}-{m + 1:02d}-{d + 1:02d}" for y, m, d in zip(self.year, self.month, self.day)]
        return {"birth_date": dates,
                "birth_city": [self.pools.city[i] for i in self.city],
                "university": [self.pools.university[i] for i in self.university],
                "employer": [self.pools.employer[i] for i in self.employer]}

    def value(self, person: int, subject: int) -> str:
        """Subject s < 4 is an attribute; s ≥ 4 is relation s − 4, answered by the target's name."""
        if subject < len(ATTRIBUTES):
            return self.attribute_values[ATTRIBUTES[subject]][person]
        return self.names[self.relations[person, subject - len(ATTRIBUTES)]]

    def to_arrow(self, metadata: dict[str, str] | None = None):
        """The profiles as a table (one row per person) for Parquet."""
        import pyarrow as pa

        columns = {"index": np.arange(self.size), "name": self.names,
                   "first_name": [self.pools.first[i] for i in self.first],
                   "middle_name": [self.pools.middle[i] for i in self.middle],
                   "last_name": [self.pools.last[i] for i in self.last], **self.attribute_values}
        for r in range(self.relations.shape[1]):
            columns[RELATIONS[r]] = self.relations[:, r]
        return pa.table(columns).replace_schema_metadata(metadata or {})


def build_profiles(p: ProfilesParams) -> Profiles:
    pools = make_pools(p)
    n = p.num_profiles
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([p.seed, n, p.relations])))
    space = p.first_names * p.middle_names * p.last_names
    codes = np.empty(0, dtype=np.int64)
    while len(codes) < n:  # unique full names, in order of drawing
        draw = np.concatenate([codes, rng.integers(0, space, size=n - len(codes) + 64)])
        _, first_seen = np.unique(draw, return_index=True)
        codes = draw[np.sort(first_seen)][:n]
    first, rest = np.divmod(codes, p.middle_names * p.last_names)
    middle, last = np.divmod(rest, p.last_names)
    target = rng.integers(0, n - 1, size=(n, p.relations))
    target += target >= np.arange(n)[:, None]  # uniform over the other n − 1 people
    return Profiles(pools, first, middle, last, rng.integers(0, YEARS, n), rng.integers(0, MONTHS, n),
                    rng.integers(0, DAYS, n), rng.integers(0, p.cities, n), rng.integers(0, p.universities, n),
                    rng.integers(0, p.employers, n), target)


@functools.lru_cache(maxsize=4)
def _profiles(frozen: tuple) -> Profiles:
    return build_profiles(ProfilesParams(*frozen))


# ----------------------------------------------------------------------------------------------------
# Held-out two-hop sets


@dataclass(frozen=True)
class HeldOut:
    """Membership tables of the held-out two-hop sets; a tuple (p, r, s) with bridge b = rel[p, r]
    belongs to the first set that claims it."""
    first_people: np.ndarray  # bool[N]
    relations: np.ndarray  # bool[R]
    person_relation_pairs: np.ndarray  # bool[N, R]
    second_people: np.ndarray  # bool[N]
    second_subjects: np.ndarray  # bool[A]
    second_person_subject_pairs: np.ndarray  # bool[N, A]
    complete_tuples: np.ndarray  # sorted tuple ids
    members: tuple = ()  # sorted tuple ids of each set, in HELDOUT_SETS order

    def category(self, person, relation, subject, bridge) -> np.ndarray:
        """Index into HELDOUT_SETS of each tuple's set, or −1 for tuples available to training."""
        n_subjects = self.second_subjects.shape[0]
        tuple_id = (person * self.relations.shape[0] + relation) * n_subjects + subject
        checks = [self.first_people[person], self.relations[relation], self.person_relation_pairs[person, relation],
                  self.second_people[bridge], self.second_subjects[subject],
                  self.second_person_subject_pairs[bridge, subject], np.isin(tuple_id, self.complete_tuples)]
        out = np.full(np.shape(person), -1)
        for i in reversed(range(len(checks))):  # the first claim wins
            out = np.where(checks[i], i, out)
        return out


def _choose(rng, shape, k: int) -> np.ndarray:
    flat = np.zeros(int(np.prod(shape)), dtype=bool)
    flat[rng.choice(flat.size, size=min(k, flat.size), replace=False)] = True
    return flat.reshape(shape)


def build_heldout(p: ProfilesParams, profiles: Profiles) -> HeldOut:
    n, r = profiles.size, p.relations
    a = len(ATTRIBUTES) + r
    f = p.heldout_fraction
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([p.seed, n, r, 1])))
    held = HeldOut(_choose(rng, n, int(n * f)), _choose(rng, r, max(1, int(r * f))),
                   _choose(rng, (n, r), int(n * r * f)), _choose(rng, n, int(n * f)),
                   _choose(rng, a, max(1, int(a * f))), _choose(rng, (n, a), int(n * a * f)),
                   np.empty(0, dtype=np.int64))
    # complete tuples: drawn among the tuples no other set claims
    want = int(n * r * a * p.heldout_tuple_fraction)
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < want:
        ids = rng.integers(0, n * r * a, size=2 * (want - len(chosen)) + 16)
        person, rest = np.divmod(ids, r * a)
        relation, subject = np.divmod(rest, a)
        free = held.category(person, relation, subject, profiles.relations[person, relation]) == -1
        chosen = np.unique(np.concatenate([chosen, ids[free]]))
        if len(chosen) > want:
            chosen = rng.choice(chosen, size=want, replace=False)
    held = dataclasses.replace(held, complete_tuples=np.sort(chosen))
    members = [[] for _ in HELDOUT_SETS]
    for lo in range(0, n * r * a, 1 << 20):  # every tuple's set, a million at a time
        ids = np.arange(lo, min(lo + (1 << 20), n * r * a))
        person, rest = np.divmod(ids, r * a)
        relation, subject = np.divmod(rest, a)
        category = held.category(person, relation, subject, profiles.relations[person, relation])
        for c in range(len(HELDOUT_SETS)):
            members[c].append(ids[category == c])
    return dataclasses.replace(held, members=tuple(np.concatenate(m) for m in members))


# ----------------------------------------------------------------------------------------------------
# The task


class ProfilesQATask(Task):
    Params = ProfilesParams
    has_cot = False  # questions and answers only
    measures_capacity = True
    _MAX_REDRAWS = 200

    @functools.cached_property
    def profiles(self) -> Profiles:
        return _profiles(dataclasses.astuple(self.params))  # the params object itself is not hashable

    @functools.cached_property
    def heldout_sets(self) -> HeldOut | None:
        """None when no two-hop question is trained (nothing to hold out)."""
        return build_heldout(self.params, self.profiles) if self.params.two_hop_fraction > 0 else None

    @property
    def num_subjects(self) -> int:
        return len(ATTRIBUTES) + self.params.relations

    @staticmethod
    def subject_text(subject: int) -> str:
        names = ATTRIBUTES + RELATIONS
        return names[subject].replace("_", " ")

    def one_hop(self, person: np.ndarray, subject: np.ndarray) -> list[Example]:
        profiles = self.profiles
        return [Example(f"What was {profiles.names[p]}'s {self.subject_text(s)}?", "", profiles.value(p, s))
                for p, s in zip(person.tolist(), subject.tolist())]

    def two_hop(self, person: np.ndarray, relation: np.ndarray, subject: np.ndarray) -> list[Example]:
        names, rel = self.profiles.names, self.profiles.relations
        out = []
        for p, r, s in zip(person.tolist(), relation.tolist(), subject.tolist()):
            bridge = int(rel[p, r])
            out.append(Example(f"What was {names[p]}'s {self.subject_text(len(ATTRIBUTES) + r)}'s "
                               f"{self.subject_text(s)}?", names[bridge], self.profiles.value(bridge, s)))
        return out

    def _split_tuple(self, ids: np.ndarray):
        r, a = self.params.relations, self.num_subjects
        person, rest = np.divmod(ids, r * a)
        relation, subject = np.divmod(rest, a)
        return person, relation, subject, self.profiles.relations[person, relation]

    def _training_tuples(self, split: str, index: np.ndarray, first_draw: int) -> np.ndarray:
        """One tuple id per index, uniform over the tuples no held-out set claims, redrawn from the same
        counter until it is one (most draws are)."""
        total = self.profiles.size * self.params.relations * self.num_subjects
        ids = (counter_hash(self.params.seed, split, index, first_draw) % np.uint64(total)).astype(np.int64)
        bad = self.heldout_sets.category(*self._split_tuple(ids)) != -1
        draw = first_draw + 1
        while bad.any():
            if draw - first_draw > self._MAX_REDRAWS:
                raise RuntimeError("could not draw a two-hop tuple outside the held-out sets")
            new = (counter_hash(self.params.seed, split, index[bad], draw) % np.uint64(total)).astype(np.int64)
            ids[bad] = new
            bad[bad] = self.heldout_sets.category(*self._split_tuple(new)) != -1
            draw += 1
        return ids

    def _heldout_tuples(self, split: str, category: int, k: int) -> np.ndarray:
        """Up to k distinct tuples of a held-out set, in a fixed pseudo-random order."""
        members = self.heldout_sets.members[category]
        keys = counter_hash(self.params.seed + 1000 * (category + 1), split, np.arange(len(members), dtype=np.uint64))
        return members[np.argsort(keys, kind="stable")[:k]]

    def examples(self, start: int, stop: int) -> list[Example]:
        """Training questions: one-hop facts uniform over (person, subject); two-hop questions with
        probability two_hop_fraction, uniform over the tuples no held-out set claims."""
        index = np.arange(start, stop, dtype=np.uint64)
        n, a = self.profiles.size, self.num_subjects
        two = (counter_hash(self.params.seed, "train", index, 0) >> np.uint64(11)) < np.uint64(
            int(self.params.two_hop_fraction * 2**53))
        fact = (counter_hash(self.params.seed, "train", index, 1) % np.uint64(n * a)).astype(np.int64)
        person, subject = np.divmod(fact, a)
        out = self.one_hop(person, subject)
        if two.any():
            where = np.flatnonzero(two)
            person, relation, subject, _ = self._split_tuple(self._training_tuples("train", index[where], 2))
            for i, e in zip(where, self.two_hop(person, relation, subject)):
                out[i] = e
        return out

    def eval_sets(self, split: str) -> dict[str, list[Example]]:
        """Fixed sets of `eval_questions`: trained one-hop facts, trained two-hop tuples, and each
        held-out two-hop set; keys are metric prefixes."""
        prefix = "eval" if split == "valid" else "test"
        k = self.params.eval_questions
        n, a = self.profiles.size, self.num_subjects
        index = np.arange(k, dtype=np.uint64)
        fact = (counter_hash(self.params.seed, split, index, 0) % np.uint64(n * a)).astype(np.int64)
        sets = {f"{prefix}/onehop": self.one_hop(*np.divmod(fact, a))}
        if self.heldout_sets is not None:
            sets[f"{prefix}/twohop"] = self.two_hop(*self._split_tuple(self._training_tuples(split, index, 1))[:3])
            for category, name in enumerate(HELDOUT_SETS):
                ids = self._heldout_tuples(split, category, k)
                if len(ids):
                    sets[f"{prefix}/{name}"] = self.two_hop(*self._split_tuple(ids)[:3])
        return sets

    def heldout(self, split: str) -> list[Example]:
        return [e for examples in self.eval_sets(split).values() for e in examples]

    def heldout_prompts(self) -> set[str]:
        """Prompts of the held-out two-hop sets: never in the training stream (one-hop facts are all
        trained, by design)."""
        return {e.prompt for split in ("valid", "test") for key, examples in self.eval_sets(split).items()
                if key.split("/")[1] in HELDOUT_SETS for e in examples}

    def capacity_questions(self) -> dict[int, tuple[list[Example], np.ndarray, float]]:
        """hops → (questions, subject of each, fraction of the population measured) whose answer losses
        measure capacity: every one-hop fact, or a uniform sample of `capacity_questions` when there are
        more; and likewise the trained two-hop tuples when two-hop questions are trained."""
        n, a, k = self.profiles.size, self.num_subjects, self.params.capacity_questions
        rng = np.random.default_rng([self.params.seed, 7])
        fact = np.arange(n * a) if n * a <= k else np.sort(rng.choice(n * a, size=k, replace=False))
        person, subject = np.divmod(fact, a)
        out = {1: (self.one_hop(person, subject), subject, len(fact) / (n * a))}
        if self.heldout_sets is not None:
            total = n * self.params.relations * a
            trained = total - sum(len(m) for m in self.heldout_sets.members)
            ids = np.arange(total) if total <= 2 * k else rng.choice(total, size=2 * k, replace=False)
            ids = np.sort(ids[self.heldout_sets.category(*self._split_tuple(ids)) == -1][:k])
            person, relation, subject, _ = self._split_tuple(ids)
            out[2] = (self.two_hop(person, relation, subject), subject, len(ids) / trained)
        return out

    def corpus(self):
        """Every one-hop question once (every value and name appears in one)."""
        n, a = self.profiles.size, self.num_subjects
        person, subject = np.divmod(np.arange(n * a), a)
        return [f"Question: {e.prompt} Answer: {e.answer}" for e in self.one_hop(person, subject)]

    def length_probe(self, tokenizer=None) -> list[Example]:
        """Worst-case questions: the byte-level tokenizer splits at spaces and "'s", so a question's
        length is the sum of its parts' lengths, and the longest part of each kind bounds every question."""
        if tokenizer is None:
            return self.heldout("valid")

        def longest(values):
            values = sorted(set(values))
            counts = [len(ids) for ids in tokenizer([" " + v for v in values], add_special_tokens=False)["input_ids"]]
            return values[int(np.argmax(counts))]

        pools = self.profiles.pools
        name = " ".join(longest(pool) for pool in (pools.first, pools.middle, pools.last))
        values = [name, "2099-12-28", *pools.city, *pools.university, *pools.employer]
        answer = longest(values)
        subject = longest([self.subject_text(s) for s in range(self.num_subjects)])
        relation = longest([self.subject_text(len(ATTRIBUTES) + r) for r in range(self.params.relations)])
        return [Example(f"What was {name}'s {subject}?", "", answer),
                Example(f"What was {name}'s {relation}'s {subject}?", "", answer)]

    def write_artifacts(self, directory: str) -> bool:
        """profiles.parquet, with the task parameters and the statistics of §1.5 in its metadata."""
        import json

        import pyarrow.parquet as pq

        metadata = {"reasonlab.task": json.dumps(dataclasses.asdict(self.params)),
                    "reasonlab.statistics": json.dumps(self.statistics())}
        pq.write_table(self.profiles.to_arrow(metadata), f"{directory}/{PROFILES_FILE}")
        return True

    def show(self, example: Example) -> str:
        return f"Question: {example.prompt} Answer: {example.answer}"

    def statistics(self) -> dict[str, float]:
        """Sizes the capacity formulas need (capacity_and_grokking.md §1.5), from the realized profiles."""
        pr = self.profiles
        return {
            "num_profiles": int(pr.size), "relations": self.params.relations,
            "distinct_first": len(np.unique(pr.first)), "distinct_middle": len(np.unique(pr.middle)),
            "distinct_last": len(np.unique(pr.last)),
            "distinct_dates": len(np.unique((pr.year * MONTHS + pr.month) * DAYS + pr.day)),
            "distinct_birth_city": len(np.unique(pr.city)), "distinct_university": len(np.unique(pr.university)),
            "distinct_employer": len(np.unique(pr.employer)),
            **{f"distinct_{RELATIONS[r]}": len(np.unique(pr.relations[:, r])) for r in range(self.params.relations)},
            "date_support": DATE_SUPPORT,
            "pool_first": len(pr.pools.first), "pool_middle": len(pr.pools.middle), "pool_last": len(pr.pools.last),
            "pool_birth_city": len(pr.pools.city), "pool_university": len(pr.pools.university),
            "pool_employer": len(pr.pools.employer),
        }

