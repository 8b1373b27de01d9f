"""The capacity study's core: profiles, questions, held-out two-hop sets, packing, sizing, bit counting."""
import math

import numpy as np
import pytest
import torch

from conftest import cli_in_fresh_python
from reasonlab.analysis.capacity import (SubjectLoss, capacity, capacity_rows, entropies, invert_two_hop_loss,
                                         log2_binomial, selection_bits, subjects)
from reasonlab.config import ModelConfig, config_from_dict
from reasonlab.methods import make_method, sequence_length
from reasonlab.models.causal import build_causal_lm, count_parameters, count_used_parameters, size_for_params
from reasonlab.tasks import make_task
from reasonlab.tasks.profiles import HELDOUT_SETS, ProfilesQATask, build_profiles
from reasonlab.tokenizer import build_tokenizer


def _task(**task) -> ProfilesQATask:
    return make_task(config_from_dict({"task": {"name": "profiles_qa", **task}, "method": {"name": "qa"}}).task)


def test_profiles_are_a_pure_function_of_size_relations_and_seed():
    a, b = _task(num_profiles=300, relations=4, seed=1), _task(num_profiles=300, relations=4, seed=1)
    assert a.profiles.names == b.profiles.names and a.profiles.attribute_values == b.profiles.attribute_values
    assert np.array_equal(build_profiles(a.params).relations, b.profiles.relations)
    other = _task(num_profiles=300, relations=4, seed=2)
    assert other.profiles.names != a.profiles.names
    p = a.profiles
    assert len(set(p.names)) == 300  # unique full names
    assert p.relations.shape == (300, 4) and not (p.relations == np.arange(300)[:, None]).any()  # never oneself
    assert len(p.pools.first) == 400 and len(p.pools.city) == 200 and len(p.pools.employer) == 263
    table = p.to_arrow()
    assert table.num_rows == 300 and table.column("worst_enemy").to_pylist() == p.relations[:, 3].tolist()


def test_questions_follow_the_templates_and_answer_from_the_profiles():
    task = _task(num_profiles=50, relations=2, two_hop_fraction=0.5)
    p = task.profiles
    one = task.one_hop(np.array([3, 3]), np.array([1, 4]))  # birth city; relation 0 = parent
    assert one[0].prompt == f"What was {p.names[3]}'s birth city?" and one[0].answer == p.pools.city[p.city[3]]
    assert one[1].prompt == f"What was {p.names[3]}'s parent?" and one[1].answer == p.names[p.relations[3, 0]]
    (two,) = task.two_hop(np.array([3]), np.array([1]), np.array([0]))  # child's birth date
    bridge = p.relations[3, 1]
    assert two.prompt == f"What was {p.names[3]}'s child's birth date?"
    assert two.answer == p.attribute_values["birth_date"][bridge] and two.cot == p.names[bridge]
    stream = task.examples(0, 4000)
    twohop = sum(e.prompt.count("'s ") == 2 for e in stream) / len(stream)  # "'s" once per hop
    assert 0.45 < twohop < 0.55
    assert task.examples(100, 110) == stream[100:110]  # index-addressed


def test_heldout_two_hop_questions_never_appear_in_the_training_stream():
    task = _task(num_profiles=60, relations=4, two_hop_fraction=0.9, heldout_fraction=0.05)
    held = task.heldout_sets
    heldout_prompts = {e.prompt for c in range(len(HELDOUT_SETS))
                       for e in task.two_hop(*task._split_tuple(held.members[c])[:3])}
    assert all(len(m) for m in held.members)  # every set is populated
    trained = {e.prompt for e in task.examples(0, 40_000)}
    assert heldout_prompts and not heldout_prompts & trained
    # evaluation sets come from their own category; the trained two-hop set from the training tuples
    for key, examples in task.eval_sets("valid").items():
        name = key.split("/")[1]
        if name in HELDOUT_SETS:
            assert {e.prompt for e in examples} <= heldout_prompts
    assert not {e.prompt for e in task.eval_sets("valid")["eval/twohop"]} & heldout_prompts
    assert task.heldout_prompts() <= heldout_prompts


def test_capacity_of_a_perfect_model_is_the_dataset_entropy():
    task = _task(num_profiles=200, relations=4)
    stats = task.statistics()
    perfect = {a: SubjectLoss(0.0, 0.0, 200) for a in subjects(4)}
    for scheme in ("optimal", "enumerate", "independent", "azl"):
        c = capacity(perfect, stats, 1, scheme)
        assert c.bits == pytest.approx(c.dataset_entropy) and c.ci95 == 0
    # a model no better than an uninformed prior stores nothing, under every scheme (no free selection bits)
    wide = entropies(stats, "independent")
    clueless = {a: SubjectLoss(wide[a] + 3, 1.0, 200) for a in subjects(4)}
    for scheme in ("optimal", "enumerate", "independent"):
        assert capacity(clueless, stats, 1, scheme).bits == 0
    # one that knows which names and dates exist but nothing about who has which gets the selection bits
    prior = entropies(stats, "optimal")
    sets_only = {a: SubjectLoss(prior[a], 1.0, 200) for a in subjects(4)}
    assert capacity(sets_only, stats, 1, "optimal").bits == pytest.approx(selection_bits(stats, "optimal"))


def test_capacity_formulas_on_a_hand_computed_case():
    stats = {"num_profiles": 10, "relations": 1, "distinct_first": 2, "distinct_middle": 2, "distinct_last": 4,
             "distinct_dates": 8, "distinct_birth_city": 4, "distinct_university": 2, "distinct_employer": 8,
             "distinct_parent": 8, "date_support": 64, "pool_birth_city": 8, "pool_university": 4,
             "pool_employer": 16}
    # H: date 3, city 2, university 1, employer 3, parent 3 bits; losses: 1 bit each
    losses = {a: SubjectLoss(1.0, 0.0, 10) for a in subjects(1)}
    gain = (3 - 1) + (2 - 1) + (1 - 1) + (3 - 1) + (3 - 1)  # = 7 bits per person
    names = log2_binomial(16, 10)  # which 10 of the 2·2·4 = 16 possible names
    dates = log2_binomial(64, 8)
    assert capacity(losses, stats, 1, "optimal").bits == pytest.approx(10 * gain + names + dates)
    assert capacity(losses, stats, 1, "enumerate").bits == pytest.approx(10 * gain + 10 * 4 + dates)
    # independent: dates cost log2 64 = 6, the parent log2 16 = 4; no selection terms
    assert capacity(losses, stats, 1, "independent").bits == pytest.approx(10 * ((6 - 1) + 1 + 0 + 2 + (4 - 1)))
    # Allen-Zhu & Li: log2 S0 = log2(64 · 8 · 4 · 16 · 9) per person, minus the summed losses
    assert capacity(losses, stats, 1, "azl").bits == pytest.approx(10 * (math.log2(64 * 8 * 4 * 16 * 9) - 5))
    # two hops: big-hash multiplies by R (1 here); double maps losses to per-hop losses, relations twice
    assert capacity(losses, stats, 2, "2-hop-big-hash").bits == pytest.approx(10 * gain + names + dates)
    per_hop = {a: invert_two_hop_loss(1.0, 2 ** h) for a, h in entropies(stats, "optimal").items()}
    double = sum((2 if a == "parent" else 1) * 10 * (h - per_hop[a])
                 for a, h in entropies(stats, "optimal").items())
    assert capacity(losses, stats, 2, "2-hop-double").bits == pytest.approx(double + names + dates)
    with pytest.raises(ValueError):
        capacity(losses, stats, 1, "2-hop-double")


def test_two_hop_loss_inversion():
    n = 8
    p = 0.5
    two_hop = p * p + (1 - p) / n
    assert invert_two_hop_loss(-math.log2(two_hop), n) == pytest.approx(1.0)
    assert invert_two_hop_loss(0.0, n) == pytest.approx(0.0)
    assert invert_two_hop_loss(5.0, n) == 3.0  # no better than guessing: the prior


def test_sampled_losses_get_a_confidence_interval_and_a_census_none():
    stats = _task(num_profiles=100, relations=4).statistics()
    rng = np.random.default_rng(0)
    subject = np.repeat(np.arange(8), 50)
    table = {"hops": np.ones(400), "subject": subject, "loss_nats": rng.exponential(1.0, 400),
             "fraction": np.full(400, 0.5)}
    (row,) = capacity_rows(table, stats, 1000, 800)
    assert row["ci95_optimal"] > 0 and row["bits_per_param_optimal"] == pytest.approx(row["capacity_optimal"] / 800)
    table["fraction"] = np.ones(400)
    assert capacity_rows(table, stats, 1000, 800)[0]["ci95_optimal"] == 0


@pytest.fixture(scope="module")
def qa_setup():
    cfg = config_from_dict({"task": {"name": "profiles_qa", "num_profiles": 40, "relations": 2,
                                     "two_hop_fraction": 0.5, "vocab_size": 400},
                            "method": {"name": "qa", "pack": 3}})
    task = make_task(cfg.task)
    return task, make_method(cfg.method), build_tokenizer(task)


# fp32 and bf16 autocast, on CUDA too where there is one (the GPU machine runs SDPA's CUDA kernels)
DEVICES = [(device, dtype) for device in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
           for dtype in (None, torch.bfloat16)]


@pytest.mark.parametrize("device,dtype", DEVICES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_questions_do_not_see_each_other(qa_setup, arch, device, dtype):
    task, method, tok = qa_setup
    seq_len = sequence_length(task, method, tok)
    examples = task.examples(0, 6)
    batch = {k: torch.from_numpy(v).to(device) for k, v in method.encode(examples, tok, seq_len).items()}
    assert batch["input_ids"].shape == (2, seq_len)
    torch.manual_seed(0)
    model = build_causal_lm(ModelConfig(arch=arch, n_layer=2, d_model=32, n_head=2), len(tok), 64,
                            tok.eos_token_id, torch.device(device)).eval()
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype is not None)
    atol = 1e-5 if dtype is None else 1e-2  # bf16 moves these logits (std 0.11) by up to 0.002
    with autocast:
        packed = method.logits(model, batch)
        width = packed.shape[1]
        # the check can fail: one causal mask over the whole row (questions attending to each other)
        # moves the logits by far more than the tolerance
        leaky = model(input_ids=batch["input_ids"][:, :width], position_ids=batch["position_ids"][:, :width],
                      attention_mask=torch.ones_like(batch["input_ids"][:, :width]), use_cache=False).logits
    assert (leaky.float() - packed.float()).abs().max() > 4 * atol
    with autocast:
        # the loss runs the output layer on answer positions only: the same value and gradient as all logits
        full = torch.nn.functional.cross_entropy(packed[:, :-1].flatten(0, 1).float(),
                                                 batch["labels"][:, 1:width].flatten(), ignore_index=-100)
        fast, _ = method.loss(model, batch)
    assert torch.allclose(fast, full, atol=1e-6 if dtype is None else 1e-3)
    grad_fast = torch.autograd.grad(fast, model.get_output_embeddings().weight)[0]
    grad_full = torch.autograd.grad(full, model.get_output_embeddings().weight)[0]
    assert torch.allclose(grad_fast, grad_full, atol=1e-7 if dtype is None else 1e-4)
    alone = method.__class__(method.Params(name="qa", pack=1))
    for i, example in enumerate(examples):
        row, slot = divmod(i, 3)
        single = {k: torch.from_numpy(v).to(device) for k, v in alone.encode([example], tok, seq_len).items()}
        length = int(single["attention_mask"].sum())
        start = int(np.flatnonzero(batch["position_ids"][row].cpu().numpy() == 0)[slot])  # each restarts at 0
        with autocast:
            expected = alone.logits(model, single)[0, :length]
        assert torch.allclose(packed[row, start:start + length].float(), expected.float(), atol=atol)
        # loss only on the answer and its EOS
        target = tok(f" {example.answer}{tok.eos_token}", add_special_tokens=False)["input_ids"]
        labels = batch["labels"][row, start:start + length]
        assert labels[labels != -100].tolist() == target


def test_model_sizing_and_used_parameter_count(qa_setup):
    _, _, tok = qa_setup
    for arch, target in [("gpt2", 60_000), ("llama", 120_000)]:
        cfg = ModelConfig(arch=arch, n_layer=2, n_params=target)
        d, heads = size_for_params(cfg, lambda m: build_causal_lm(m, len(tok), 64, tok.eos_token_id,
                                                                  torch.device("meta")))
        model = build_causal_lm(ModelConfig(arch=arch, n_layer=2, d_model=d, n_head=heads), len(tok), 64,
                                tok.eos_token_id, torch.device("cpu"))
        n = count_parameters(model)
        step = 4 * 16 * (len(tok) + 64)  # what one more head changes, roughly
        assert d % 16 == 0 and heads == d // 16 and abs(n - target) < step
        used = [0, 5, 9]
        assert count_used_parameters(model, used) == n - (len(tok) - 3) * d


def test_data_sample_prints_questions_and_answers():
    proc = cli_in_fresh_python("data", "sample", "profiles_qa", "-n", "5")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("Question: ")]
    assert proc.returncode == 0 and len(lines) == 5 and all(" Answer: " in l for l in lines)
