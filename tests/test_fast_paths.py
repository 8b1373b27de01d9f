"""The GPU throughput paths, checked on the CPU: packed autoregressive rows (`method.pack`), the compiled
training step (`train.compile`) and the static-cache decoder (`eval.decoder=static`)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reasonlab.config import ConfigError, config_from_dict
from reasonlab.loop import TrainLoop
from reasonlab.methods import IGNORE, autoregressive, make_method, sequence_length
from reasonlab.models import build_causal_lm
from reasonlab.tasks import make_task
from reasonlab.tokenizer import build_tokenizer

CPU = torch.device("cpu")
TASK = {"name": "multiplication", "a_digits": 2, "b_digits": 2}


def _setup(method: dict, train: dict | None = None):
    cfg = config_from_dict({"task": TASK, "method": method, "train": train or {}})
    task = make_task(cfg.task)
    tok = build_tokenizer(task)
    m = make_method(cfg.method, cfg)
    m.setup(task, tok)
    return cfg, task, tok, m


def _tensors(rows: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in rows.items()}


def _model(tok, arch="gpt2", seed=0):
    """A tiny random model whose greedy choices vary: with the default init (small weights, tied embeddings) every
    position predicts its own token again."""
    torch.manual_seed(seed)
    cfg = config_from_dict({"task": TASK, "model": {"arch": arch, "n_layer": 2, "d_model": 32, "n_head": 2}})
    model = build_causal_lm(cfg.model, len(tok), 64, tok.eos_token_id, CPU).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position predicting the next label (0 where there is no label)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:logits.shape[1]], ignore_index=IGNORE,
                           reduction="none")


# ---- packing ----

@pytest.mark.parametrize("name", ["cot", "nocot", "internalize"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_examples_have_their_own_loss_and_never_see_each_other(name, arch):
    # internalize: 3 per row × 64 rows is the same 192 examples per step as 192 single rows, so both remove the
    # same chain tokens from the same stream indices (step 7: one token, plus each index's offset)
    removal = {"remove_per_epoch": 64} if name == "internalize" else {}
    _, task, tok, packed = _setup({"name": name, "pack": 3, **removal}, {"batch_size": 64})
    _, _, _, single = _setup({"name": name, **removal}, {"batch_size": 192})
    indices = np.arange(7 * 192, 7 * 192 + 6)
    examples = task.examples(int(indices[0]), int(indices[-1]) + 1)
    seq_len = sequence_length(task, packed, tok)
    assert seq_len == 3 * sequence_length(task, single, tok)
    rows = _tensors(packed.encode(examples, tok, seq_len, indices=indices))
    alone = _tensors(single.encode(examples, tok, seq_len // 3, indices=indices))
    assert rows["input_ids"].shape == (2, seq_len)
    model = _model(tok, arch)
    with torch.no_grad():
        logits = packed.logits(model, rows)
        alone_logits = single.logits(model, alone)
        # the batch loss is the same mean over the same target tokens
        assert torch.allclose(packed.loss(model, rows)[0], single.loss(model, alone)[0], atol=1e-5)
    packed_losses, alone_losses = _token_losses(logits, rows["labels"]), _token_losses(alone_logits, alone["labels"])
    for i in range(len(examples)):
        row, slot = divmod(i, 3)
        length = int(alone["attention_mask"][i].sum())
        start = int(np.flatnonzero(rows["position_ids"][row].numpy() == 0)[slot])  # positions restart per example
        assert torch.equal(rows["input_ids"][row, start:start + length], alone["input_ids"][i, :length])
        assert torch.equal(rows["labels"][row, start:start + length], alone["labels"][i, :length])
        assert torch.allclose(logits[row, start:start + length], alone_logits[i, :length], atol=1e-5)
        # per-example loss: every target token's loss equals the loss it has in a row of its own
        stop = start + length - 1
        assert torch.allclose(packed_losses[row, start:stop], alone_losses[i, :length - 1], atol=1e-5)
        assert rows["labels"][row, start] == IGNORE  # no example learns to predict the next one's first token
    # changing the first example's tokens changes its own logits and no one else's
    changed = dict(rows, input_ids=rows["input_ids"].clone())
    first = int(alone["attention_mask"][0].sum())
    changed["input_ids"][0, :first] = torch.randint(1, len(tok), (first,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        after = packed.logits(model, changed)
        # one causal mask over the whole row instead: the later examples' logits would move
        leaky = model(input_ids=changed["input_ids"][:, :after.shape[1]],
                      position_ids=changed["position_ids"][:, :after.shape[1]],
                      attention_mask=torch.ones_like(changed["input_ids"][:, :after.shape[1]])).logits
    assert (after[0, :first] - logits[0, :first]).abs().max() > 1e-2
    assert torch.allclose(after[0, first:], logits[0, first:], atol=1e-5)
    assert torch.equal(after[1], logits[1])
    assert (leaky[0, first:] - logits[0, first:]).abs().max() > 1e-2


def test_pack_is_checked_for_every_autoregressive_method():
    for name in ("cot", "nocot", "internalize", "qa"):
        with pytest.raises(ConfigError, match=r"^method\.pack: expected a value > 0, got 0$"):
            config_from_dict({"task": TASK, "method": {"name": name, "pack": 0}})
    with pytest.raises(ConfigError, match=r"^method\.pack: unknown key"):
        config_from_dict({"task": TASK, "method": {"name": "diffusion", "pack": 2}})


# ---- compiled training step ----

def test_compiled_training_step_matches_eager():
    cfg, task, tok, method = _setup({"name": "cot", "pack": 2}, {"warmup_steps": 0, "lr": 3e-3})
    seq_len = sequence_length(task, method, tok)
    batches = [_tensors(method.encode(task.examples(i * 32, i * 32 + 32), tok, seq_len)) for i in range(3)]
    losses, weights = {}, {}
    for compiled in (False, True):
        model = _model(tok)
        loop = TrainLoop(model, method, dataclasses.replace(cfg.train, compile=compiled), CPU)
        assert (model._compiled_call_impl is not None) == (loop.module._compiled_call_impl is not None) == compiled
        losses[compiled] = torch.stack([loop.train_step([b])[0] for b in batches])
        weights[compiled] = model.get_input_embeddings().weight.detach().clone()
    assert torch.allclose(losses[True], losses[False], rtol=1e-5)
    assert losses[False][-1] < losses[False][0]  # the steps trained (the comparison is not of constants)
    assert torch.allclose(weights[True], weights[False], atol=1e-5)


def test_compile_and_decoder_keys_are_checked():
    with pytest.raises(ConfigError, match=r"^train\.compile: expected true or false, got str 'yes'$"):
        config_from_dict({"task": TASK, "train": {"compile": "yes"}})
    with pytest.raises(ConfigError, match=r"^eval\.decoder: expected one of \['dynamic', 'static'\]"):
        config_from_dict({"task": TASK, "eval": {"decoder": "cuda"}})
    with pytest.raises(ConfigError, match=r"^eval\.decoder: a KV cache applies to token-by-token decoding"):
        config_from_dict({"task": TASK, "method": {"name": "diffusion"}, "eval": {"decoder": "static"}})
    assert config_from_dict({"task": TASK, "eval": {"decoder": "static"}}).eval.decoder == "static"


# ---- static-cache decoding ----

def _prompts(task, tok, method, n: int) -> dict:
    eos = tok.eos_token
    texts = [method.prompt_text(e, eos) for e in task.heldout("test")[:n]]
    texts[0] = " 1 2 * 3 4 5 6 " + eos  # a longer prompt: the others are left-padded
    return tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt",
               return_token_type_ids=False)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_cache_decoder_writes_the_dynamic_decoders_tokens(arch):
    _, task, tok, method = _setup({"name": "cot"})
    model = _model(tok, arch)
    enc = _prompts(task, tok, method, 4)
    assert (enc["attention_mask"] == 0).any()
    for rows in ([0], [1], [2], [0, 1, 2, 3]):  # batch 1, several prompts, and a left-padded batch
        ids, mask = enc["input_ids"][rows], enc["attention_mask"][rows]
        ids, mask = ids[:, int((mask == 0).all(0).sum()):], mask[:, int((mask == 0).all(0).sum()):]
        dynamic = autoregressive.decode(model, ids, mask, max_new_tokens=24, eos_id=tok.eos_token_id,
                                        stop_after=100, decoder="dynamic")
        static = autoregressive.decode(model, ids, mask, max_new_tokens=24, eos_id=tok.eos_token_id,
                                       stop_after=100, decoder="static")
        assert dynamic.shape == (len(rows), 24) and len(dynamic.unique()) > 3  # varied tokens, full budget
        assert torch.equal(static, dynamic)
        # stopping: a token the first row writes stands in for EOS, so rows stop (and pad) at different steps
        stop_id = int(dynamic[0, 5])
        early = [autoregressive.decode(model, ids, mask, max_new_tokens=24, eos_id=stop_id, stop_after=1,
                                       decoder=d) for d in ("dynamic", "static")]
        assert (early[0][0, 5:] == stop_id).all() and torch.equal(early[0], early[1])
    # one cache per (rows, slots, autocast) serves every call: CUDA graphs replay on the same buffers
    assert len(autoregressive._static_caches[model]) == 2


def test_static_decoder_through_evaluate_and_its_step_compiles_to_one_graph():
    """The step the CUDA path compiles (mode="reduce-overhead": CUDA graphs, not available here) traces as one
    graph without breaks, and decoding does not recompile it token by token."""
    from reasonlab.evaluate import evaluate

    _, task, tok, method = _setup({"name": "cot"})
    model = _model(tok)
    examples = task.heldout("test")[:6]
    kwargs = {"batch_size": 3, "max_new_tokens": 20, "device": CPU}
    dynamic, static = (evaluate(model, tok, method, examples, decoder=d, **kwargs) for d in ("dynamic", "static"))
    assert [p["generated"] for p in static.predictions] == [p["generated"] for p in dynamic.predictions]
    assert len({p["generated"] for p in dynamic.predictions}) > 1

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(autoregressive._static_step, fullgraph=True)
    enc = _prompts(task, tok, method, 2)
    reference = autoregressive.decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=12,
                                      eos_id=tok.eos_token_id, stop_after=100)
    steps = autoregressive.StaticCacheSteps(model, 2, enc["input_ids"].shape[1], 12)
    steps.step = compiled
    with torch.inference_mode():
        position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
        logits = steps.prefill(enc["input_ids"], enc["attention_mask"], position_ids)
        tokens = []
        for _ in range(12):
            tokens.append(logits.argmax(-1))
            position_ids = position_ids[:, -1:] + 1
            logits = steps.next(tokens[-1], position_ids)
    assert torch.equal(torch.stack(tokens, 1), reference)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_a_lasting_evaluation_gets_a_progress_bar_and_a_quick_one_none():
    """`evaluate` reports after each batch; `LastingBar` draws a bar only once the evaluation has lasted, then
    counts every example and closes, and the accuracy is the same with or without it."""
    from reasonlab.evaluate import LastingBar, evaluate

    _, task, tok, method = _setup({"name": "cot"})
    model = _model(tok)
    examples = task.heldout("test")[:10]
    bars = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.total, self.desc, self.counted, self.closed = total, desc, 0, False
            bars.append(self)

        def update(self, n):
            self.counted += n

        def close(self):
            self.closed = True

    kwargs = {"batch_size": 3, "max_new_tokens": 8, "device": CPU}
    calls = []
    plain = evaluate(model, tok, method, examples, progress=lambda done, total: calls.append((done, total)), **kwargs)
    assert calls == [(3, 10), (6, 10), (9, 10), (10, 10)]
    evaluate(model, tok, method, examples, progress=LastingBar("quick", after_s=3600, bar=Bar), **kwargs)
    assert bars == []
    barred = evaluate(model, tok, method, examples, progress=LastingBar("test", after_s=0, bar=Bar), **kwargs)
    assert len(bars) == 1 and (bars[0].total, bars[0].desc, bars[0].counted, bars[0].closed) == (10, "test", 10, True)
    assert barred.accuracy == plain.accuracy
    assert [p["generated"] for p in barred.predictions] == [p["generated"] for p in plain.predictions]
