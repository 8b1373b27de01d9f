"""The grokking study's knowledge graph: the paper's counts, ID/OOD splits derived again from the atomic
facts, φ downsampling, determinism, no test fact in the training stream, per-epoch order, bad values,
the tokenizer on the format, and a small model fitting the atomic facts with the answer-only loss."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import cli_in_fresh_python
from reasonlab.config import ConfigError, config_from_dict
from reasonlab.evaluate import evaluate
from reasonlab.loop import TrainLoop
from reasonlab.methods import make_method, sequence_length, target_length
from reasonlab.models import build_causal_lm
from reasonlab.tasks import make_task
from reasonlab.tasks.knowledge_graph import EVAL_SETS, KnowledgeGraphTask, _knowledge_graph
from reasonlab.tokenizer import build_tokenizer

CPU = torch.device("cpu")
# small graphs whose named evaluation sets hold every fact of their kind (eval_size above every count)
SMALL = {"composition": {"kind": "composition", "entities": 40, "relations": 8, "relations_per_entity": 4,
                         "ood_ratio": 0.2, "id_test_ratio": 0.2, "phi": 2.0, "eval_size": 100_000},
         "comparison": {"kind": "comparison", "entities": 30, "attributes": 3, "values": 5, "ood_ratio": 0.2,
                        "id_test_ratio": 0.2, "phi": 5.0, "eval_size": 100_000}}


def _cfg(**task):
    return config_from_dict({"task": {"name": "knowledge_graph", **task}, "method": {"name": "qa"}})


def _task(**task) -> KnowledgeGraphTask:
    return make_task(_cfg(**task).task)


def _epoch(task: KnowledgeGraphTask, epoch: int = 0):
    return task.examples(epoch * task.train_size, (epoch + 1) * task.train_size)


def _facts(examples) -> set[tuple[str, str]]:
    return {(e.prompt, e.answer) for e in examples}


def _atomic_table(task) -> tuple[dict, set]:
    """(prompt tokens → answer, OOD prompts) from the complete atomic sets."""
    table, ood = {}, set()
    for name in ("id_atomic", "ood_atomic"):
        for e in task.eval_set(name):
            table[tuple(e.prompt.split())] = e.answer
            if name == "ood_atomic":
                ood.add(tuple(e.prompt.split()))
    return table, ood


def test_paper_settings_give_the_papers_counts():
    # composition.ipynb: 2000 entities × 20 relations; 5% OOD; φ = 7.2 → 7.2 · 38,000 = 273,600 inferred
    task = _task()
    c = task.counts()
    assert (c["atomic_id"], c["atomic_ood"], c["inferred_train"]) == (38_000, 2_000, 273_600)
    assert task.train_size == 40_000 + 273_600
    enumerated = 2000 * 20 * 20  # every 2-hop path
    assert c["inferred_trainable"] + c["inferred_test_id"] < enumerated * 0.95 ** 2 * 1.01
    assert 0.003 < c["inferred_test_id"] / (c["inferred_trainable"] + c["inferred_test_id"]) < 0.007  # 0.5%
    assert 1000 < c["inferred_test_ood"] < 3000  # both hops among the 5% OOD: ~800,000 · 0.05²
    heads = Counter(e.prompt.split()[0] for e in task.atomic_examples(task.graph.atomic))
    assert len(heads) == 2000 and set(heads.values()) == {20}
    assert [len(task.eval_set(name)) for name in EVAL_SETS] == [3000, 3000, 2000, 3000, c["inferred_test_ood"]]
    # comparison.ipynb: 1000 entities, 20 attributes, 10% OOD per attribute; OOD pairs in both orders
    c = _task(kind="comparison").counts()
    assert (c["atomic_id"], c["atomic_ood"], c["inferred_train"]) == (18_000, 2_000, round(7.2 * 18_000))
    assert c["inferred_test_ood"] == 20 * 100 * 99
    assert c["inferred_trainable"] + c["inferred_test_id"] == 20 * 900 * 899
    assert 0.09 < c["inferred_test_id"] / (20 * 900 * 899) < 0.11


@pytest.mark.parametrize("ood_split", ["fact", "entity"])
def test_composition_splits_follow_from_the_atomic_facts(ood_split):
    task = _task(**SMALL["composition"], ood_split=ood_split)
    p = task.params
    table, ood = _atomic_table(task)
    assert len(table) == 40 * 4 and len(ood) == round(0.2 * 160)
    ood_heads = {h for h, _ in ood}
    if ood_split == "entity":  # every fact of an OOD head entity, and only those
        assert len(ood_heads) == round(0.2 * 40) and ood == {k for k in table if k[0] in ood_heads}
    else:
        assert len(ood_heads) > round(0.2 * 40)  # facts drawn one by one spread over more heads
    for head in range(40):
        relations = [r for (h, r) in table if h == f"<e_{head}>"]
        assert len(relations) == len(set(relations)) == 4  # distinct relations per head entity
    both_id, both_ood, mixed = {}, {}, {}
    for (h, r1), bridge in table.items():
        for (b, r2), tail in table.items():
            if b == bridge:
                hops_ood = ((h, r1) in ood, (b, r2) in ood)
                group = both_id if hops_ood == (False, False) else both_ood if all(hops_ood) else mixed
                group[f"{h} {r1} {r2}"] = tail
    epoch = _epoch(task)
    trained = {(e.prompt, e.answer) for e in epoch if e.prompt.count(" ") == 2}
    test_id = _facts(task.eval_set("test_inferred_id"))
    assert trained and test_id and mixed
    assert trained | test_id <= set(both_id.items())  # both hops ID, with the composed answer
    assert not trained & test_id
    assert _facts(task.eval_set("test_inferred_ood")) == set(both_ood.items())
    assert not {prompt for prompt, _ in trained | test_id} & set(mixed)
    # atomic facts, ID and OOD, are all trained, once per epoch
    atomic = Counter((e.prompt, e.answer) for e in epoch if e.prompt.count(" ") == 1)
    assert set(atomic) == {(" ".join(k), v) for k, v in table.items()} and set(atomic.values()) == {1}
    # at the largest φ the graph allows, the pool is every ID inferred fact not held out
    c = task.counts()
    full = _task(**{**SMALL["composition"], "ood_split": ood_split, "phi": c["inferred_trainable"] / c["atomic_id"]})
    assert {(e.prompt, e.answer) for e in _epoch(full) if e.prompt.count(" ") == 2} | test_id == set(both_id.items())
    assert p.id_test_ratio * 0.5 < len(test_id) / len(both_id) < p.id_test_ratio * 1.5


def test_comparison_splits_follow_from_the_atomic_facts():
    task = _task(**SMALL["comparison"])
    table, ood = _atomic_table(task)
    assert len(table) == 30 * 3 and len(ood) == 3 * round(0.2 * 30)  # the OOD split is per attribute
    expected = {}
    for (e1, a), (e2, a2) in itertools.permutations(table, 2):
        if a == a2:
            v1, v2 = int(table[e1, a].strip("<>")), int(table[e2, a2].strip("<>"))
            label = f"<{a.strip('<>')}_{int(np.sign(v1 - v2)) + 1}>"  # <attr_a_0|1|2>: <, =, >
            expected[f"{a} <q> {e1} <mask> {e2}"] = (label, ((e1, a) in ood, (e2, a) in ood))
    epoch = _epoch(task)
    trained = _facts(e for e in epoch if "<q>" in e.prompt)
    test_id, test_ood = _facts(task.eval_set("test_inferred_id")), _facts(task.eval_set("test_inferred_ood"))
    assert all(expected[prompt] == (answer, (False, False)) for prompt, answer in trained | test_id)
    assert test_ood == {(prompt, label) for prompt, (label, side) in expected.items() if side == (True, True)}
    assert trained and test_id and not trained & test_id
    # a held-out pair is held out in both orders
    swapped = {f"{a} {q} {e2} {m} {e1}" for a, q, e1, m, e2 in (p.split() for p, _ in test_id)}
    assert swapped == {prompt for prompt, _ in test_id}
    labels = Counter(answer.rsplit("_", 1)[1] for _, answer in trained)
    assert set(labels) == {"0>", "1>", "2>"} and labels["0>"] == pytest.approx(labels["2>"], rel=0.3)


@pytest.mark.parametrize("kind", ["composition", "comparison"])
def test_phi_sets_the_pool_and_nothing_else(kind):
    tasks = {phi: _task(**{**SMALL[kind], "phi": phi}) for phi in (0.5, 1.0, 2.0)}
    pools = {}
    for phi, task in tasks.items():
        c = task.counts()
        assert c["inferred_train"] == round(phi * c["atomic_id"])
        epoch = _epoch(task)
        inferred = [e for e in epoch if e.prompt.count(" ") != 1]
        assert len(inferred) == c["inferred_train"] and len(epoch) - len(inferred) == c["atomic_id"] + c["atomic_ood"]
        pools[phi] = _facts(inferred)
        assert _facts(task.eval_set("train_inferred")) <= pools[phi]
    assert pools[0.5] < pools[1.0] < pools[2.0]  # nested: a sweep over φ varies only the pool
    for name in ("id_atomic", "ood_atomic", "test_inferred_id", "test_inferred_ood"):
        assert len({tuple(task.eval_set(name)) for task in tasks.values()}) == 1


@pytest.mark.parametrize("kind", ["composition", "comparison"])
def test_same_parameters_same_data_another_seed_another_graph(kind):
    a = _task(**SMALL[kind])
    graph = a.graph
    _knowledge_graph.cache_clear()  # built again, not taken from the cache: a pure function of the parameters
    b, other = _task(**SMALL[kind]), _task(**SMALL[kind], seed=1)
    assert b.graph is not graph and np.array_equal(b.graph.pool, graph.pool)
    assert a.examples(0, 500) == b.examples(0, 500)
    assert a.eval_sets("valid") == b.eval_sets("valid") and a.vocabulary() == b.vocabulary()
    assert _facts(a.eval_set("id_atomic")) != _facts(other.eval_set("id_atomic"))
    assert a.examples(0, 500) != other.examples(0, 500)


def test_no_inferred_test_fact_is_ever_in_the_training_stream():
    for kind in ("composition", "comparison"):
        task = _task(**SMALL[kind])
        held = task.heldout_prompts()  # complete test sets at this size
        n = task.train_size
        assert held and not held & {e.prompt for e in task.examples(0, 3 * n)}
        assert {e.prompt for e in task.eval_set("train_inferred")} <= {e.prompt for e in _epoch(task)}
    task = _task()  # the paper's composition graph: one whole epoch against the evaluated test samples
    trained = {e.prompt for e in _epoch(task)}
    assert len(trained) == task.train_size and not trained & task.heldout_prompts()


def test_the_stream_is_index_addressed_and_reshuffled_every_epoch():
    task = _task(**SMALL["composition"])
    n = task.train_size
    stream = task.examples(0, 3 * n)
    assert task.examples(n - 7, n + 5) == stream[n - 7:n + 5]  # across an epoch boundary
    resumed = _task(**SMALL["composition"])  # a restarted run: a new task, asked from where it stopped
    assert resumed.examples(2 * n + 11, 2 * n + 40) == stream[2 * n + 11:2 * n + 40]
    epochs = [stream[i * n:(i + 1) * n] for i in range(3)]
    assert all(Counter(_facts(e)) == Counter(_facts(epochs[0])) for e in epochs)  # each fact once per epoch
    assert len(_facts(epochs[0])) == n
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # a new order every epoch
    assert task.examples(5 * n + 3, 5 * n + 4) == resumed.examples(5 * n + 3, 5 * n + 4)


@pytest.mark.parametrize("kind", ["composition", "comparison"])
def test_atomic_repeat_puts_each_atomic_fact_that_many_times_in_an_epoch_and_changes_nothing_else(kind):
    once, thrice = _task(**SMALL[kind]), _task(**SMALL[kind], atomic_repeat=3)
    assert thrice.graph is once.graph and thrice.eval_sets("valid") == once.eval_sets("valid")
    c = once.counts()
    n_atomic = c["atomic_id"] + c["atomic_ood"]
    assert thrice.train_size == 3 * n_atomic + c["inferred_train"] == once.train_size + 2 * n_atomic
    epoch = Counter((e.prompt, e.answer) for e in _epoch(thrice))
    atomic = {f for f in _facts(_epoch(once)) if f[0].count(" ") == 1}
    assert len(atomic) == n_atomic and all(epoch[f] == 3 for f in atomic)
    assert all(n == 1 for f, n in epoch.items() if f not in atomic) and sum(epoch.values()) == thrice.train_size
    n = thrice.train_size  # still index-addressed: a restarted run continues where it stopped
    assert _task(**SMALL[kind], atomic_repeat=3).examples(n - 5, n + 9) == thrice.examples(0, 2 * n)[n - 5:n + 9]


@pytest.mark.parametrize("fields, key", [
    ({"phi": 0}, "phi"), ({"phi": -1.5}, "phi"), ({"atomic_repeat": 0}, "atomic_repeat"),
    ({"relations": 10, "relations_per_entity": 11}, "relations_per_entity"),
    ({"relations_per_entity": 0}, "relations_per_entity"),
    ({"ood_ratio": 0}, "ood_ratio"), ({"ood_ratio": 1}, "ood_ratio"), ({"ood_ratio": 1.5}, "ood_ratio"),
    ({"ood_ratio": -0.1}, "ood_ratio"), ({"id_test_ratio": 1.0}, "id_test_ratio"),
    ({"entities": 1}, "entities"), ({"eval_size": 0}, "eval_size"), ({"relations": 0}, "relations"),
    ({"kind": "comparison", "values": 1}, "values"), ({"kind": "comparison", "attributes": 0}, "attributes"),
    ({"kind": "comparison", "entities": 10, "ood_ratio": 0.1}, "ood_ratio"),  # one OOD entity: no OOD pair
    ({"kind": "triangles"}, "kind"), ({"kind": "comparison", "ood_split": "fact"}, "ood_split"),
    ({"ood_split": "entity", "entities": 10, "ood_ratio": 0.01}, "ood_ratio"), ({"ood_split": "heads"}, "ood_split"),
    # what only the graph tells: more inferred facts than it has, none held out, no OOD path
    ({"entities": 100, "relations_per_entity": 4, "phi": 10}, "phi"), ({"phi": 1e-6}, "phi"),
    ({"entities": 100, "relations_per_entity": 4, "phi": 1, "id_test_ratio": 1e-6}, "id_test_ratio"),
    ({"entities": 100, "relations_per_entity": 2, "ood_ratio": 0.01, "phi": 1, "id_test_ratio": 0.2}, "ood_ratio"),
])
def test_impossible_values_name_their_key(fields, key):
    with pytest.raises(ConfigError) as e:
        _cfg(**fields)
    assert str(e.value).startswith(f"task.{key}: ") and "\n" not in str(e.value)


def test_cli_samples_comparison_facts_in_the_papers_format_and_rejects_bad_values():
    proc = cli_in_fresh_python("data", "sample", "knowledge_graph", "-n", "5", "kind=comparison")
    lines = proc.stdout.splitlines()[:-1]
    assert proc.returncode == 0 and len(lines) == 5, proc.stderr
    for line in lines:
        kind, fact, arrow, answer = line.split()
        assert arrow == "→" and answer.endswith("</a>")
        if kind == "atomic":
            assert fact.startswith("<e_") and "><attr_" in fact and answer[1:-5].strip("<>").isdigit()
        else:
            assert kind == "inferred" and fact.startswith("<attr_") and "><q><e_" in fact and "><mask><e_" in fact
            assert answer.startswith(fact.split(">")[0] + "_")  # the attribute's own label tokens
    proc = cli_in_fresh_python("data", "sample", "knowledge_graph", "phi=0")
    assert proc.returncode == 2 and proc.stderr.strip() == "reasonlab: error: task.phi: expected a value > 0, got 0.0"
    assert proc.stdout.strip() == "NO_RAY"


@pytest.mark.parametrize("kind", ["composition", "comparison"])
def test_every_token_of_the_format_is_one_vocabulary_token(kind):
    task = _task(**SMALL[kind])
    tok = build_tokenizer(task)
    method = make_method(_cfg(**SMALL[kind]).method)
    eos = tok.eos_token
    examples = [*task.heldout("valid"), *task.examples(0, 200)]
    for e in examples:
        prompt, target = method.prompt_text(e, eos), method.target_text(e, eos)
        ids = tok(prompt + target, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.convert_ids_to_tokens(ids) == [*prompt.split(), e.answer, eos]  # one token per word
        assert method.answer(tok.decode(tok(target, add_special_tokens=False)["input_ids"]), eos) == e.answer
    batch = method.encode(examples[:64], tok, sequence_length(task, method, tok))
    supervised = batch["labels"] != -100
    assert (supervised.sum(1) == 2).all()  # the answer and the end marker, nothing of the prompt
    answers = tok.convert_ids_to_tokens(batch["labels"][supervised].reshape(-1, 2)[:, 0].tolist())
    assert answers == [e.answer for e in examples[:64]]


def test_a_small_model_fits_the_atomic_facts_with_the_answer_only_loss():
    """Facts → tokenizer → qa's encode → answer-only loss → TrainLoop → greedy decoding → exact match."""
    cfg = config_from_dict({
        "task": {"name": "knowledge_graph", "entities": 30, "relations": 6, "relations_per_entity": 3,
                 "ood_ratio": 0.2, "id_test_ratio": 0.2, "phi": 0.5},
        "method": {"name": "qa"}, "model": {"n_layer": 2, "d_model": 64, "n_head": 4},
        "train": {"lr": 3e-3, "max_steps": 400, "warmup_steps": 20, "batch_size": 32, "weight_decay": 0.0}})
    task = make_task(cfg.task)
    tok = build_tokenizer(task)
    method = make_method(cfg.method, cfg)
    seq_len = sequence_length(task, method, tok)
    torch.manual_seed(0)
    model = build_causal_lm(cfg.model, len(tok), seq_len + 8, tok.eos_token_id, CPU)  # room to decode past EOS
    loop = TrainLoop(model, method, cfg.train, CPU)
    size = cfg.train.batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only waits on a second thread (4 s instead of a minute)
    try:
        for step in range(cfg.train.max_steps):  # fits at ~300 steps
            examples = task.examples(step * size, (step + 1) * size)
            loop.train_step([{k: torch.from_numpy(v) for k, v in method.encode(examples, tok, seq_len).items()}])
        for name in ("id_atomic", "ood_atomic"):  # both trained
            result = evaluate(model, tok, method, task.eval_set(name), batch_size=128,
                              max_new_tokens=target_length(task, method, tok) + 2, device=CPU)
            assert result.accuracy >= 0.9, (name, result.accuracy, result.predictions[:3])
    finally:
        torch.set_num_threads(threads)
