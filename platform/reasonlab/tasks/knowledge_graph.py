"""Facts over a random knowledge graph, for the grokking study (Wang et al. 2024, Grokked Transformers;
capacity_and_grokking.md §2, turn2_additions.md §3), generated as the paper's notebooks do.

composition: |E| entities and |R| relations; each head entity has `relations_per_entity` distinct
  relations, each to a uniformly random tail. An atomic fact is (h, r) → t, and a share `ood_ratio` of the
  atomic facts is OOD: drawn fact by fact as composition.ipynb does, or (`ood_split: entity`) head entity
  by head entity, all facts of an OOD head being OOD. An inferred fact is (h, r1, r2) → t through the
  bridge b, (h, r1) → b, (b, r2) → t.
  Both hops ID: an ID inferred fact, held out for `test_inferred_id` with probability `id_test_ratio`, in
  the training pool otherwise; both hops OOD: `test_inferred_ood`; one of each: not used.
comparison: |E| entities and `attributes` attributes with `values` ordinal values, uniform per (entity,
  attribute); for each attribute a share `ood_ratio` of the entities is OOD. An atomic fact is
  (e, a) → v; an inferred fact compares two entities on an attribute (<, =, >), in both orders. Both
  entities ID: the unordered pair goes (both orders) to `test_inferred_id` with probability
  `id_test_ratio`, to the training pool otherwise; both OOD: `test_inferred_ood`; mixed: not used.

The training set is every atomic fact, ID and OOD, and round(φ · |ID atomic facts|) inferred facts of
the pool; no held-out inferred fact is ever in it. The stream visits it epoch by epoch, each epoch in
its own seeded order, so example i is a function of i and a restarted run continues where it stopped.

Format (one token each, as in the paper): composition `<e_h> <r_1> <r_2>` → `<e_t>`, atomic
`<e_h> <r>` → `<e_t>`; comparison `<attr_a> <q> <e_1> <mask> <e_2>` → `<attr_a_0|1|2>` (<, =, >), atomic
`<e> <attr_a>` → `<v>`. The answer is one token; the tokenizer's EOS after it plays the paper's `</a>`.

Every random choice is a hash of the seed and the identity of what is chosen (a fact, a pair), so the
graph, the OOD split and the test sets do not depend on φ or on the size of the evaluation samples, and
the training pools of two values of φ are nested (a sweep over φ varies only the pool).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from reasonlab.errors import ConfigError
from reasonlab.tasks.base import Example, Task, counter_hash

# the notebooks' settings (capacity_and_grokking.md §2.1), the defaults of the fields left at None
PAPER_SETTINGS = {
    "composition": {"entities": 2000, "ood_ratio": 0.05, "ood_split": "fact", "id_test_ratio": 0.005},
    "comparison": {"entities": 1000, "ood_ratio": 0.1, "ood_split": "entity", "id_test_ratio": 0.1},
}
# the named evaluation sets (the paper's probe types); atomic ones are trained, the test ones never
EVAL_SETS = ("train_inferred", "id_atomic", "ood_atomic", "test_inferred_id", "test_inferred_ood")
# template words of the answer-only methods (qa: `Question: … Answer:`; nocot: `#### answer`), so
# they are one token each instead of <unk>
TEMPLATE_WORDS = ("Question:", "Answer:", "####")
MAX_ENUMERATED = 20_000_000  # inferred facts enumerated at once (the paper's composition has 800,000)
# hash streams: what each random draw is for
_RELATIONS, _TAIL, _VALUE, _OOD, _ID_TEST, _POOL, _SAMPLE = range(7)
_EPOCH = 100  # epoch k's order draws from stream _EPOCH + k, after every other stream


@dataclass
class KnowledgeGraphParams:
    name: str = "knowledge_graph"
    kind: Literal["composition", "comparison"] = "composition"
    entities: int | None = None  # |E|; None: the paper's (2000 composition, 1000 comparison)
    relations: int = 200  # composition: |R|
    relations_per_entity: int = 20  # composition: distinct relations of each head entity
    attributes: int = 20  # comparison
    values: int = 20  # comparison: ordinal values of each attribute
    # composition: share of atomic facts that is OOD; comparison: share of entities OOD for each
    # attribute. None: the paper's (0.05, 0.1)
    ood_ratio: float | None = None
    # composition: OOD atomic facts drawn one by one (the paper's) or as all facts of OOD head entities;
    # comparison: entity (per attribute) only. None: the paper's
    ood_split: Literal["fact", "entity"] | None = None
    phi: float = 7.2  # trained inferred facts per ID atomic fact
    # share of ID inferred facts (comparison: ID pairs) held out for test_inferred_id. None: the
    # paper's (0.005, 0.1)
    id_test_ratio: float | None = None
    eval_size: int = 3000  # facts in each named evaluation set, at most (the paper's probes)
    seed: int = 0  # fixes the graph, the splits, the pool and the order of every epoch
    # times each atomic fact comes in one epoch of the training stream (1: the paper's); more gives the atomic
    # facts a larger share of each batch without changing the graph, its splits or the inferred pool
    atomic_repeat: int = 1

    def __post_init__(self) -> None:
        for key, value in PAPER_SETTINGS.get(self.kind, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def check(self) -> None:
        if self.entities < 2:
            raise ConfigError(f"task.entities: expected at least 2, got {self.entities}")
        for key in ("ood_ratio", "id_test_ratio"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"task.{key}: expected a value in (0, 1), got {getattr(self, key)}")
        if self.phi <= 0:
            raise ConfigError(f"task.phi: expected a value > 0, got {self.phi}")
        if self.eval_size < 1:
            raise ConfigError(f"task.eval_size: expected a value > 0, got {self.eval_size}")
        if self.atomic_repeat < 1:
            raise ConfigError(f"task.atomic_repeat: expected a whole number ≥ 1, got {self.atomic_repeat}")
        if self.kind == "composition":
            self._check_composition()
        else:
            self._check_comparison()
        knowledge_graph(self)  # what only the built graph tells: enough inferred facts for φ, non-empty test sets

    def _check_composition(self) -> None:
        if self.relations < 1:
            raise ConfigError(f"task.relations: expected at least 1, got {self.relations}")
        if not 1 <= self.relations_per_entity <= self.relations:
            raise ConfigError(f"task.relations_per_entity: expected 1 to task.relations ({self.relations}) distinct "
                              f"relations per head entity, got {self.relations_per_entity}")
        atomic = self.entities * self.relations_per_entity
        units, what = (atomic, "atomic facts") if self.ood_split == "fact" else (self.entities, "head entities")
        if not 1 <= round(self.ood_ratio * units) < units:
            raise ConfigError(f"task.ood_ratio: {self.ood_ratio} of {units} {what} leaves no "
                              f"{'OOD' if self.ood_ratio < 0.5 else 'ID'} atomic fact")
        if atomic * self.relations_per_entity > MAX_ENUMERATED:
            raise ConfigError(f"task.entities: {self.entities} entities × {self.relations_per_entity}² relations "
                              f"per entity are more than {MAX_ENUMERATED} inferred facts to enumerate")

    def _check_comparison(self) -> None:
        if self.attributes < 1:
            raise ConfigError(f"task.attributes: expected at least 1, got {self.attributes}")
        if self.values < 2:
            raise ConfigError(f"task.values: expected at least 2, got {self.values}")
        if self.ood_split != "entity":
            raise ConfigError(f"task.ood_split: comparison splits the entities of each attribute; expected entity, "
                              f"got {self.ood_split}")
        ood = round(self.ood_ratio * self.entities)
        if not 2 <= ood <= self.entities - 2:  # a comparison needs two entities of its side
            raise ConfigError(f"task.ood_ratio: {self.ood_ratio} of {self.entities} entities gives {ood} OOD and "
                              f"{self.entities - ood} ID entities; comparisons need at least 2 of each")
        if self.entities ** 2 > MAX_ENUMERATED:
            raise ConfigError(f"task.entities: {self.entities}² pairs per attribute are more than "
                              f"{MAX_ENUMERATED} to enumerate")


# ----------------------------------------------------------------------------------------------------
# Random draws


def _hash(p: KnowledgeGraphParams, stream: int, index) -> np.ndarray:
    return counter_hash(p.seed, "train", np.asarray(index, dtype=np.uint64), stream)


def _below(hashes: np.ndarray, probability: float) -> np.ndarray:
    """A Bernoulli(probability) draw per hash."""
    return (hashes >> np.uint64(11)) < np.uint64(int(probability * 2**53))


def _smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k smallest keys, smallest first: with random keys, a uniform sample of k without
    replacement, in random order."""
    k = min(k, len(keys))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(keys, k - 1)[:k]
    return part[np.argsort(keys[part], kind="stable")]


class _Sample:
    """The k codes with the smallest keys of all offered, chunk by chunk (comparison offers one attribute
    at a time); counts everything offered."""

    def __init__(self, k: int) -> None:
        self.k, self.total = k, 0
        self._keys: list[np.ndarray] = []
        self._codes: list[np.ndarray] = []

    def offer(self, keys: np.ndarray, codes: np.ndarray) -> None:
        keep = _smallest(keys, self.k)
        self._keys.append(keys[keep])
        self._codes.append(codes[keep])
        self.total += len(codes)

    def codes(self) -> np.ndarray:
        if not self._codes:
            return np.empty(0, dtype=np.int64)
        keys, codes = np.concatenate(self._keys), np.concatenate(self._codes)
        return codes[_smallest(keys, self.k)]


# ----------------------------------------------------------------------------------------------------
# The graph


@dataclass(frozen=True)
class KnowledgeGraph:
    """Facts as integer codes. Composition: atomic h·R + r, inferred (h·R + r1)·R + r2; comparison:
    atomic a·E + e, inferred (a·E + e1)·E + e2. `table` answers them: composition tail[h, r] (−1 where h
    has no relation r), comparison value[a, e]."""
    table: np.ndarray
    atomic: np.ndarray  # every atomic fact's code, ascending
    atomic_ood: np.ndarray  # bool, per atomic fact
    pool: np.ndarray  # the trained inferred facts
    sets: dict  # name → codes of the named evaluation set (EVAL_SETS)
    counts: dict  # sizes of the complete sets behind the samples


def _composition_facts(p: KnowledgeGraphParams):
    """(answer table, atomic codes, OOD mask per atomic fact, inferred facts as chunks of (trainable,
    held-out ID, OOD) codes)."""
    E, R, d = p.entities, p.relations, p.relations_per_entity
    rank = _hash(p, _RELATIONS, np.arange(E * R)).reshape(E, R)
    relation = np.sort(np.argpartition(rank, d - 1, axis=1)[:, :d], axis=1)  # d distinct relations per head
    head = np.repeat(np.arange(E), d)
    relation = relation.ravel()
    atomic = head * R + relation  # ascending: heads in order, relations sorted within each
    tail = (_hash(p, _TAIL, atomic) % np.uint64(E)).astype(np.int64)
    table = np.full((E, R), -1, dtype=np.int64)
    table[head, relation] = tail
    if p.ood_split == "fact":
        ood = np.zeros(len(atomic), dtype=bool)
        ood[_smallest(_hash(p, _OOD, atomic), round(p.ood_ratio * len(atomic)))] = True
    else:
        ood_head = np.zeros(E, dtype=bool)
        ood_head[_smallest(_hash(p, _OOD, np.arange(E)), round(p.ood_ratio * E))] = True
        ood = ood_head[head]
    # every 2-hop path: first hop f = (h, r1, b), then each of the bridge's d facts, rows b·d … b·d + d − 1
    first = np.repeat(np.arange(len(atomic)), d)
    second = tail[first] * d + np.tile(np.arange(d), len(atomic))
    code = atomic[first] * R + relation[second]
    both_id = code[~ood[first] & ~ood[second]]
    held = _below(_hash(p, _ID_TEST, both_id), p.id_test_ratio)
    return table, atomic, ood, [(both_id[~held], both_id[held], code[ood[first] & ood[second]])]


def _comparison_facts(p: KnowledgeGraphParams):
    """Like _composition_facts, the inferred facts one attribute at a time."""
    E, A = p.entities, p.attributes
    atomic = np.arange(A * E)  # a·E + e
    table = (_hash(p, _VALUE, atomic) % np.uint64(p.values)).astype(np.int64).reshape(A, E)
    rank = _hash(p, _OOD, atomic).reshape(A, E)
    n_ood = round(p.ood_ratio * E)
    ood = np.zeros((A, E), dtype=bool)
    np.put_along_axis(ood, np.argpartition(rank, n_ood - 1, axis=1)[:, :n_ood], True, axis=1)

    def ordered_pairs(entities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e1, e2 = (x.ravel() for x in np.meshgrid(entities, entities, indexing="ij"))
        return e1[e1 != e2], e2[e1 != e2]

    def chunks():
        for a in range(A):
            e1, e2 = ordered_pairs(np.flatnonzero(~ood[a]))
            pair = (a * E + np.minimum(e1, e2)) * E + np.maximum(e1, e2)  # both orders share the draw
            held = _below(_hash(p, _ID_TEST, pair), p.id_test_ratio)
            both_id = (a * E + e1) * E + e2
            e1, e2 = ordered_pairs(np.flatnonzero(ood[a]))
            yield both_id[~held], both_id[held], (a * E + e1) * E + e2

    return table, atomic, ood.ravel(), chunks()


@functools.lru_cache(maxsize=8)
def _knowledge_graph(frozen: tuple) -> KnowledgeGraph:
    p = KnowledgeGraphParams(*frozen)
    build = _composition_facts if p.kind == "composition" else _comparison_facts
    table, atomic, ood, inferred = build(p)
    n_id_atomic = int((~ood).sum())
    want = round(p.phi * n_id_atomic)
    pool, test_id, test_ood = _Sample(want), _Sample(p.eval_size), _Sample(p.eval_size)
    for trainable, held_id, both_ood in inferred:
        pool.offer(_hash(p, _POOL, trainable), trainable)
        test_id.offer(_hash(p, _SAMPLE, held_id), held_id)
        test_ood.offer(_hash(p, _SAMPLE, both_ood), both_ood)
    if want < 1:
        raise ConfigError(f"task.phi: {p.phi} × {n_id_atomic} ID atomic facts rounds to no inferred fact to train on; "
                          f"expected at least {0.5 / n_id_atomic:.2g}")
    if want > pool.total:
        raise ConfigError(f"task.phi: {p.phi} × {n_id_atomic} ID atomic facts = {want} inferred facts to train on; "
                          f"the graph has {pool.total} (φ at most {pool.total / n_id_atomic:.3g})")
    if not test_id.total:
        raise ConfigError(f"task.id_test_ratio: {p.id_test_ratio} of {pool.total} ID inferred facts holds none out "
                          f"for test_inferred_id; raise it")
    if not test_ood.total:
        parts = "hops" if p.kind == "composition" else "entities"
        raise ConfigError(f"task.ood_ratio: no inferred fact has both {parts} OOD at {p.ood_ratio}; raise it")
    pool_codes = pool.codes()

    def sample(codes: np.ndarray) -> np.ndarray:
        return codes[_smallest(_hash(p, _SAMPLE, codes), p.eval_size)]

    sets = {"train_inferred": sample(pool_codes), "id_atomic": sample(atomic[~ood]),
            "ood_atomic": sample(atomic[ood]), "test_inferred_id": test_id.codes(),
            "test_inferred_ood": test_ood.codes()}
    counts = {"atomic_id": n_id_atomic, "atomic_ood": int(ood.sum()), "inferred_train": len(pool_codes),
              "inferred_trainable": pool.total, "inferred_test_id": test_id.total,
              "inferred_test_ood": test_ood.total}
    return KnowledgeGraph(table, atomic, ood, pool_codes, sets, counts)


def knowledge_graph(p: KnowledgeGraphParams) -> KnowledgeGraph:
    """The graph of a configuration (built once per process and configuration)."""
    # the params object itself is not hashable; the atomic facts' repeat is the stream's, not the graph's
    return _knowledge_graph(dataclasses.astuple(dataclasses.replace(p, atomic_repeat=1)))


# ----------------------------------------------------------------------------------------------------
# The task


class KnowledgeGraphTask(Task):
    Params = KnowledgeGraphParams
    has_cot = False  # implicit reasoning: the answer directly
    eval_set_names: ClassVar[tuple[str, ...]] = EVAL_SETS

    def __init__(self, params: KnowledgeGraphParams) -> None:
        super().__init__(params)
        self._orders: dict[int, np.ndarray] = {}  # the latest epochs' orders of the training set

    @functools.cached_property
    def graph(self) -> KnowledgeGraph:
        return knowledge_graph(self.params)

    @property
    def train_size(self) -> int:
        """Facts in one epoch of the training stream: every atomic fact `atomic_repeat` times and the inferred
        pool."""
        return len(self.graph.atomic) * self.params.atomic_repeat + len(self.graph.pool)

    def counts(self) -> dict[str, int]:
        """Sizes of the atomic and inferred sets (the named evaluation sets sample them)."""
        return dict(self.graph.counts)

    # ---- facts → examples ----
    def atomic_examples(self, codes: np.ndarray) -> list[Example]:
        p, table = self.params, self.graph.table
        if p.kind == "composition":
            head, relation = np.divmod(codes, p.relations)
            return [Example(f"<e_{h}> <r_{r}>", "", f"<e_{t}>")
                    for h, r, t in zip(head.tolist(), relation.tolist(), table[head, relation].tolist())]
        attribute, entity = np.divmod(codes, p.entities)
        return [Example(f"<e_{e}> <attr_{a}>", "", f"<{v}>")
                for e, a, v in zip(entity.tolist(), attribute.tolist(), table[attribute, entity].tolist())]

    def inferred_examples(self, codes: np.ndarray) -> list[Example]:
        p, table = self.params, self.graph.table
        if p.kind == "composition":
            first, r2 = np.divmod(codes, p.relations)
            head, r1 = np.divmod(first, p.relations)
            tail = table[table[head, r1], r2]
            return [Example(f"<e_{h}> <r_{a}> <r_{b}>", "", f"<e_{t}>")
                    for h, a, b, t in zip(head.tolist(), r1.tolist(), r2.tolist(), tail.tolist())]
        first, e2 = np.divmod(codes, p.entities)
        attribute, e1 = np.divmod(first, p.entities)
        label = np.sign(table[attribute, e1] - table[attribute, e2]) + 1  # 0: <, 1: =, 2: >
        return [Example(f"<attr_{a}> <q> <e_{x}> <mask> <e_{y}>", "", f"<attr_{a}_{c}>")
                for a, x, y, c in zip(attribute.tolist(), e1.tolist(), e2.tolist(), label.tolist())]

    # ---- the training stream ----
    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order of the training set: a seeded permutation (the few latest are kept)."""
        if epoch not in self._orders:
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            keys = _hash(self.params, _EPOCH + epoch, np.arange(self.train_size))
            self._orders[epoch] = np.argsort(keys, kind="stable")
        return self._orders[epoch]

    def training_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows of the training set (the atomic facts' copies first, then the pool) at stream positions start..stop-1:
        epoch i // N, position i % N of that epoch's order."""
        epoch, position = np.divmod(np.arange(start, stop, dtype=np.int64), self.train_size)
        rows = np.empty(len(epoch), dtype=np.int64)
        for e in np.unique(epoch):
            at = epoch == e
            rows[at] = self._epoch_order(int(e))[position[at]]
        return rows

    def examples(self, start: int, stop: int) -> list[Example]:
        rows = self.training_rows(start, stop)
        n_atomic = len(self.graph.atomic)
        copies = n_atomic * self.params.atomic_repeat
        is_atomic = rows < copies
        atomic = iter(self.atomic_examples(self.graph.atomic[rows[is_atomic] % n_atomic]))
        inferred = iter(self.inferred_examples(self.graph.pool[rows[~is_atomic] - copies]))
        return [next(atomic) if a else next(inferred) for a in is_atomic]

    # ---- evaluation ----
    def eval_set(self, name: str) -> list[Example]:
        """One named evaluation set: a fixed sample of at most eval_size facts, in a fixed order."""
        if name not in EVAL_SETS:
            raise ValueError(f"unknown evaluation set {name!r}; expected one of {list(EVAL_SETS)}")
        codes = self.graph.sets[name]
        return self.atomic_examples(codes) if name.endswith("_atomic") else self.inferred_examples(codes)

    def eval_sets(self, split: str) -> dict[str, list[Example]]:
        """The five named sets, keys `eval/NAME` (valid) or `test/NAME` (test): the same sets for both
        splits, as the paper has no validation split and nothing is selected on them."""
        if split not in ("valid", "test"):
            raise ValueError(f"held-out split must be valid or test, got {split!r}")
        prefix = "eval" if split == "valid" else "test"
        return {f"{prefix}/{name}": self.eval_set(name) for name in EVAL_SETS}

    def heldout(self, split: str) -> list[Example]:
        return [e for examples in self.eval_sets(split).values() for e in examples]

    def heldout_prompts(self) -> set[str]:
        """Prompts of the inferred test sets: never trained (atomic facts and train_inferred are trained, by
        design)."""
        return {e.prompt for name in ("test_inferred_id", "test_inferred_ood") for e in self.eval_set(name)}

    def finish(self, history, directory: str) -> None:
        """`grokking_curves.png`: the five named sets' accuracy against steps (log axis), as the sweep's parent
        run draws one panel per trial."""
        from reasonlab.analysis.grokking import CURVES_PNG, plot_curves

        p = self.params
        label = f"{p.kind}, |E|={p.entities}, phi={p.phi:g}, atomic facts x{p.atomic_repeat}"
        curves = history()
        if any(k.startswith("eval/") and k.endswith("/accuracy") for k in curves):
            plot_curves([(label, curves)], f"{directory}/{CURVES_PNG}")

    # ---- probes ----
    def probe_sets(self) -> dict[str, list[Example]]:
        """The inferred sets: trained, held-out ID and OOD queries."""
        return {name: self.eval_set(name) for name in ("train_inferred", "test_inferred_id", "test_inferred_ood")}

    def probe_targets(self, examples: list[Example]) -> dict[str, tuple[list[int | None], list[str]]]:
        """Composition: the bridge entity (the first hop's answer) at the first relation. Comparison: each
        entity's value of the attribute, at that entity."""
        table = self.graph.table
        words = [e.prompt.split() for e in examples]
        number = lambda token: int(token.rpartition("_")[2].rstrip(">"))  # noqa: E731  <e_12> → 12
        if self.params.kind == "composition":
            bridges = [table[number(w[0]), number(w[1])] for w in words]
            return {"bridge": ([1] * len(words), [f"<e_{b}>" for b in bridges])}
        values = {}
        for name, at in (("value1", 2), ("value2", 4)):
            values[name] = ([at] * len(words), [f"<{table[number(w[0]), number(w[at])]}>" for w in words])
        return values

    # ---- tokenizer and lengths ----
    def vocabulary(self) -> list[str]:
        p = self.params
        entities = [f"<e_{i}>" for i in range(p.entities)]
        if p.kind == "composition":
            return [*entities, *(f"<r_{i}>" for i in range(p.relations)), *TEMPLATE_WORDS]
        attributes = [f"<attr_{a}>" for a in range(p.attributes)]
        values = [f"<{v}>" for v in range(p.values)]
        labels = [f"<attr_{a}_{c}>" for a in range(p.attributes) for c in range(3)]
        return [*entities, *attributes, *values, *labels, "<q>", "<mask>", *TEMPLATE_WORDS]

    def corpus(self) -> list[str]:
        """The closed vocabulary, every token of which the facts use."""
        return [" ".join(self.vocabulary())]

    def length_probe(self, tokenizer=None) -> list[Example]:
        """An atomic and an inferred fact: every fact of a kind has the same number of tokens."""
        return [*self.atomic_examples(self.graph.atomic[:1]), *self.inferred_examples(self.graph.pool[:1])]

    def show(self, example: Example) -> str:
        """The paper's strings: the input, then the supervised answer and end marker."""
        kind = "atomic" if example.prompt.count(" ") == 1 else "inferred"
        return f"{kind:<9} {example.prompt.replace(' ', '')}  →  {example.answer}</a>"
