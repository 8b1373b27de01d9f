"""Probes without Ray: the states read through the block accessor, the logit lens against a direct computation
on a hand-built GPT-2, linear probes on separable and on random labels, and the targets tasks declare."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reasonlab.analysis.probes import layer_states, lens_logits, linear_probe, logit_lens, probe_inputs, run_probes
from reasonlab.config import config_from_dict
from reasonlab.methods import make_method, sequence_length
from reasonlab.models import build_causal_lm
from reasonlab.tasks import make_task
from reasonlab.tokenizer import build_tokenizer

CPU = torch.device("cpu")
COMPOSITION = {"name": "knowledge_graph", "entities": 30, "relations": 6, "relations_per_entity": 3,
               "ood_ratio": 0.2, "id_test_ratio": 0.2, "phi": 1.0}


def _setup(task: dict, method: str, arch: str = "gpt2"):
    cfg = config_from_dict({"task": task, "method": {"name": method},
                            "model": {"arch": arch, "n_layer": 3, "d_model": 32, "n_head": 2}})
    task, method = make_task(cfg.task), make_method(cfg.method, cfg)
    tok = build_tokenizer(task)
    torch.manual_seed(0)
    model = build_causal_lm(cfg.model, len(tok), sequence_length(task, method, tok) + 8, tok.eos_token_id, CPU)
    return task, method, tok, model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_logit_lens_equals_the_final_norm_and_output_layer_applied_to_each_layers_state(arch):
    task, method, tok, model = _setup(COMPOSITION, "qa", arch)
    examples = task.eval_set("test_inferred_id")[:5]
    inputs = probe_inputs(examples, tok, method, task.probe_targets(examples))
    states = layer_states(model, inputs.input_ids, inputs.attention_mask)
    with torch.no_grad():
        out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True)
    assert states.shape[0] == 4  # the embeddings and after each of 3 blocks
    # transformers' hidden_states[l] is block l's input for l < L (its last one has the final norm applied)
    for layer in range(3):
        assert torch.allclose(states[layer], out.hidden_states[layer], atol=1e-5)
    norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
    head = model.lm_head.weight
    # by hand: norm, then the tied output matrix; the last layer's lens is the model's own output
    with torch.no_grad():
        direct = norm(states[1]) @ head.T
    assert torch.allclose(lens_logits(model, states[1]), direct, atol=1e-5)
    assert torch.allclose(lens_logits(model, states[3]), out.logits, atol=1e-4)
    lens = logit_lens(model, states, inputs, inputs.answer_ids)
    b, p = 2, int(inputs.answer_at[2])
    probs = torch.softmax(direct, -1)
    manual = probs[:, p, torch.as_tensor(inputs.answer_ids)].diagonal().mean()  # every row has position p
    assert lens["probability"][1, p] == pytest.approx(float(manual), rel=1e-4)
    rank_b = int((direct[b, p] > direct[b, p, inputs.answer_ids[b]]).sum())
    assert 0 <= rank_b < len(tok)


def test_positions_follow_the_methods_text_and_the_declared_targets_are_right():
    task, method, tok, model = _setup(COMPOSITION, "qa")
    examples = task.eval_set("test_inferred_ood")[:20]
    targets = task.probe_targets(examples)
    inputs = probe_inputs(examples, tok, method, targets)
    # `Question: <e_h> <r_1> <r_2> Answer: <e_t><eos>`: the bridge at <r_1>, the answer predicted at `Answer:`
    assert inputs.tokens[2].startswith("<r_") and set(inputs.targets["bridge"][0]) == {2}
    assert inputs.tokens[4] == "Answer:" and set(inputs.answer_at) == {4} and len(examples) > 5
    atomic = {e.prompt: e.answer for name in ("id_atomic", "ood_atomic") for e in task.eval_set(name)}
    for e, bridge in zip(examples, targets["bridge"][1]):
        h, r1, r2 = e.prompt.split()
        assert atomic[f"{h} {r1}"] == bridge and atomic[f"{bridge} {r2}"] == e.answer  # the two hops
    assert [tok.convert_ids_to_tokens(int(i)) for i in inputs.answer_ids] == [e.answer for e in examples]
    # multiplication: the running sums' digits, at the prompt's last token (cot's prompt ends in EOS)
    mult, cot, mtok, _ = _setup({"name": "multiplication", "a_digits": 3, "b_digits": 3}, "cot")
    example = mult.heldout("test")[0]
    a, b = (int("".join(reversed(x.split()))) for x in example.prompt.split("*"))
    first_sum = a * (b % 10) + a * ((b // 10) % 10) * 10
    digits = mult.probe_targets([example])
    assert [digits[f"sum1_digit{k}"][1][0] for k in range(5)] == list(reversed(str(first_sum).zfill(5)))
    inputs = probe_inputs([example], mtok, cot, digits)
    assert inputs.tokens[int(inputs.targets["sum1_digit0"][0][0])] == mtok.eos_token


def test_linear_probes_read_a_separable_label_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    labels = [str(i % 4) for i in range(400)]
    centers = torch.randn(4, 16, generator=g) * 3
    features = centers[torch.tensor([int(x) for x in labels])] + torch.randn(400, 16, generator=g)
    readable = linear_probe(features, labels)
    assert readable["test_accuracy"] > 0.95 and readable["train_rows"] == 280 and readable["classes"] == 4
    noise = linear_probe(torch.randn(400, 16, generator=g), labels)
    assert noise["test_accuracy"] < 0.45  # chance is 0.25


def test_every_probe_runs_on_every_set_and_a_task_without_targets_gets_the_answers_logit_lens():
    task, method, tok, model = _setup(COMPOSITION, "qa")
    sets = {k: v[:30] for k, v in task.probe_sets().items()}
    assert list(sets) == ["train_inferred", "test_inferred_id", "test_inferred_ood"]
    rows = run_probes(model, tok, method, sets, task.probe_targets, ("logit_lens", "linear"))
    assert {(r["set"], r["target"]) for r in rows["logit_lens"]} == {(s, t) for s in sets for t in ("answer", "bridge")}
    assert {(r["set"], r["layer"]) for r in rows["linear"]} == {(s, layer) for s in sets for layer in range(4)}
    assert all(0 <= r["probability"] <= 1 for r in rows["logit_lens"])
    gsm_like = run_probes(model, tok, method, sets, lambda examples: {}, ("logit_lens", "linear"))
    assert {r["target"] for r in gsm_like["logit_lens"]} == {"answer"} and not gsm_like["linear"]
    assert np.isfinite([r["mean_rank"] for r in gsm_like["logit_lens"]]).all()
