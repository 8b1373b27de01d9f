"""Discrete diffusion core, in a plain process: schedules, forward processes, losses, samplers, the model.

Fast by construction: random or exact-score stand-ins for the network everywhere except one small model
that memorizes eight multiplication examples on the CPU.
"""
from __future__ import annotations

import math
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from reasonlab.config import config_from_dict
from reasonlab.methods.diffusion import DiffusionMethod, split_thoughts
from reasonlab.methods.diffusion.graph import Absorbing, Uniform
from reasonlab.methods.diffusion.loss import (diffusion_loss, perturb, sample_times, score_entropy_terms,
                                              weighted_ce_terms)
from reasonlab.methods.diffusion.sampler import SAMPLERS, sample, unmask_counts
from reasonlab.methods.diffusion.schedule import Geometric, LogLinear
from reasonlab.models.diffusion import DiffusionTransformer, DiffusionTransformerConfig, build_diffusion_lm
from reasonlab.tasks import make_task
from reasonlab.tokenizer import build_tokenizer

EPS = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and never oversubscribes a shared 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _model_cfg(**kw):
    return types.SimpleNamespace(**{"n_layer": 2, "d_model": 32, "n_head": 4, "d_ff": None, "dropout": 0.0,
                                    "max_len": None, "pretrained": None, **kw})


def _random_model(vocab: int, graph: str, seed: int = 0, scale: float = 0.3, **kw) -> DiffusionTransformer:
    """A model with every weight random (the zero-initialized head and adaLN would hide bugs)."""
    torch.manual_seed(seed)
    model = build_diffusion_lm(_model_cfg(), vocab, 64, graph=graph, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _seq_len(method, tok, examples) -> int:
    eos = tok.eos_token
    return max(len(tok(method.prompt_text(e, eos) + method.target_text(e, eos))["input_ids"]) for e in examples)


# ---- (1) the two forms of the absorbing loss ----

def test_absorbing_score_entropy_equals_mdlm_weighted_cross_entropy():
    torch.manual_seed(0)
    vocab, B, L = 11, 64, 24
    graph, schedule = Absorbing(vocab), LogLinear()
    x0 = torch.randint(0, vocab, (B, L))
    target = torch.arange(L)[None] >= torch.randint(0, L // 2, (B, 1))  # a prompt of varying length
    t = sample_times(B, "cpu").double()  # spans σ < 0.5 and σ ≥ 0.5, both expm1 branches
    x_t, sigma, dsigma = perturb(graph, schedule, x0, target, t)
    logits = torch.randn(B, L, graph.dim, dtype=torch.float64) * 3
    masked = x_t == graph.mask
    assert masked.sum() > 100 and (sigma < 0.5).any() and (sigma > 0.5).any()

    se = score_entropy_terms(graph, logits.double(), sigma, dsigma, x_t, x0)
    ce = weighted_ce_terms(graph, logits, sigma, dsigma, x_t, x0)
    torch.testing.assert_close(se, ce, rtol=1e-9, atol=1e-9)
    # for the log-linear schedule the weight σ'/(e^σ − 1) is 1/t: L = (1/t) Σ_masked CE
    nll = -F.log_softmax(logits[..., :vocab], -1).gather(-1, x0[..., None]).squeeze(-1)
    torch.testing.assert_close(ce, torch.where(masked, nll / t[:, None], 0.0), rtol=1e-6, atol=1e-9)
    assert (se[~masked] == 0).all()  # clean positions, the prompt among them, carry no loss

    # SEDD's free head pays extra: r·(u − 1 − log u) ≥ 0 with u = Σ_j s_j/r, zero when the ratios sum to r
    free = Absorbing(vocab, normalized=False)
    se_free = score_entropy_terms(free, logits, sigma, dsigma, x_t, x0)
    u = logits[..., :vocab].exp().sum(-1) / vocab
    r = dsigma[:, None] / torch.expm1(sigma)[:, None]  # σ'·r, the weight in front
    torch.testing.assert_close(se_free, torch.where(masked, ce + r * (u - 1 - u.log()), 0.0), rtol=1e-9, atol=1e-9)
    untrained = score_entropy_terms(free, torch.zeros_like(logits), sigma, dsigma, x_t, x0)  # SEDD's init: u = 1
    torch.testing.assert_close(untrained, torch.where(masked, r * math.log(vocab), 0.0), rtol=1e-9, atol=1e-9)

    # the full loss, same noise: both forms give the same number through a real model
    model = _random_model(vocab, "absorbing")
    values = [diffusion_loss(model, graph, schedule, x0, target, form=form,
                             generator=torch.Generator().manual_seed(3)) for form in ("score_entropy", "mdlm")]
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-5)


# ---- (2) the forward process ----

@pytest.mark.parametrize("t", [0.02, 0.3, 0.7, 0.99])
def test_forward_process_masks_at_the_scheduled_rate(t):
    torch.manual_seed(1)
    schedule = LogLinear()
    n_prompt, B, L = 100, 4, 50_000
    sigma = schedule.total(torch.full((B,), t))
    expected = (1 - EPS) * t
    torch.testing.assert_close(1 - torch.exp(-sigma), torch.full((B,), expected))  # the schedule's promise
    target = torch.arange(L)[None].expand(B, L) >= n_prompt
    x0 = torch.randint(0, 20, (B, L))
    graph = Absorbing(20)
    x_t = graph.sample_transition(x0, sigma[:, None], maskable=target)
    rate = (x_t[:, n_prompt:] == graph.mask).float().mean().item()
    n = B * (L - n_prompt)
    assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / n) + 1e-4
    assert torch.equal(x_t[:, :n_prompt], x0[:, :n_prompt])  # the prompt is never noised
    kept = x_t != graph.mask
    assert torch.equal(x_t[kept], x0[kept])

    # uniform: a moved token is redrawn uniformly, so it changes with probability (1 − e^{−σ})(1 − 1/N)
    uniform = Uniform(20)
    x_u = uniform.sample_transition(x0, sigma[:, None], maskable=target)
    changed = (x_u[:, n_prompt:] != x0[:, n_prompt:]).float().mean().item()
    p = expected * (1 - 1 / 20)
    assert abs(changed - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-4
    assert torch.equal(x_u[:, :n_prompt], x0[:, :n_prompt])


def test_schedules_rate_is_the_derivative_of_total_noise():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    for schedule in (LogLinear(), Geometric()):
        (grad,) = torch.autograd.grad(schedule.total(t).sum(), t)
        torch.testing.assert_close(schedule.rate(t).detach(), grad)
    ends = Geometric().total(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([1e-4, 20.0], dtype=torch.float64))


# ---- (3) confidence-first unmasking ----

def test_confidence_sampler_unmasks_one_token_per_step_when_T_is_the_target_length():
    vocab, B, L, n_prompt = 13, 6, 20, 5
    model = _random_model(vocab, "absorbing")
    graph = Absorbing(vocab)
    prompt = torch.randint(0, vocab, (B, L))
    target = (torch.arange(L) >= n_prompt)[None].expand(B, L)
    n = L - n_prompt
    masks, nfes = [], []

    def record(step, x, nfe):
        masks.append((x == graph.mask).sum(1))
        nfes.append(nfe)

    out = sample(model, graph, LogLinear(), prompt, target, steps=n, sampler="confidence", greedy=True,
                 callback=record)
    counts = torch.stack([torch.full((B,), n), *masks])  # masked target tokens before and after each step
    assert (counts[:-1] - counts[1:] == 1).all(), counts.T
    assert (counts[-1] == 0).all() and (out < vocab).all()
    assert nfes == list(range(1, n + 1))  # one model call per step

    # fewer steps unmask several per step; more steps never skip a token and cost no extra calls
    for steps in (1, 4, 7, 2 * n):
        per_step = torch.stack([unmask_counts(torch.tensor([n]), steps, i) for i in range(steps)])
        assert per_step.sum() == n and per_step.max() - per_step.min() <= 1
        masks.clear(), nfes.clear()
        sample(model, graph, LogLinear(), prompt, target, steps=steps, sampler="confidence", greedy=True,
               callback=record)
        assert (masks[-1] == 0).all() and nfes[-1] == min(steps, n)


# ---- (4) a small model memorizes a tiny dataset ----

def _train(model, method, batch, steps: int = 400) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # cosine decay to 0.1×: without it the last noisy steps leave the memorized answers slightly unsure
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * i / steps)))
    model.train()
    for _ in range(steps):
        loss, _ = method.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()


@pytest.fixture(scope="module")
def memorized():
    """A 2-layer DDiT trained on 8 2×2 multiplication examples with the real tokenizer (about 8 s)."""
    cfg = config_from_dict({"task": {"name": "multiplication", "a_digits": 2, "b_digits": 2, "heldout_size": 8}})
    task = make_task(cfg.task)
    tok = build_tokenizer(task)
    examples = task.examples(0, 8)
    method = DiffusionMethod(graph="absorbing", target="cot", sampler="analytic", steps=64)
    seq_len = _seq_len(method, tok, examples)
    torch.manual_seed(0)
    model = build_diffusion_lm(_model_cfg(d_model=64), len(tok), seq_len)
    # four copies per step: four noise levels per example, so the (1/t)-weighted loss is less noisy
    batch = {k: torch.as_tensor(v) for k, v in method.encode(examples * 4, tok, seq_len).items()}
    _train(model, method, batch)
    return types.SimpleNamespace(model=model.eval(), tok=tok, examples=examples, method=method, seq_len=seq_len)


def test_small_model_memorizes_a_tiny_dataset(memorized):
    m = memorized
    gold = {k: torch.as_tensor(v) for k, v in m.method.encode(m.examples, m.tok, m.seq_len).items()}
    n_target = int(gold["target_mask"][0].sum())
    eos = m.tok.eos_token
    accuracy = {}
    for sampler in ("analytic", "euler", "confidence"):
        for steps in (1, 4, n_target, 64):
            texts = m.method.generate_text(m.model, m.tok, m.examples, seq_len=m.seq_len, steps=steps, sampler=sampler,
                                           generator=torch.Generator().manual_seed(0))
            accuracy[sampler, steps] = sum(m.method.answer(text, eos) == " ".join(e.answer.split())
                                           for text, e in zip(texts, m.examples)) / len(m.examples)
    print(f"greedy accuracy by (sampler, T), target length {n_target}: {accuracy}")
    assert accuracy["analytic", 64] == accuracy["euler", 64] == accuracy["confidence", n_target] == 1.0
    # the whole target reproduced token for token: chain, answer and EOS padding
    ids = m.method.generate(m.model, gold, steps=64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ids, gold["input_ids"])


# ---- (5) score entropy: non-negative, zero at the true score ----

def _true_log_ratio(graph, sigma, x_t, x0):
    """log q_σ(j | x0) − log q_σ(x_t | x0) for every state j."""
    onehot = F.one_hot(x0, graph.dim).double()
    s = sigma[..., None]
    if graph.absorbing:
        q = torch.exp(-s) * onehot
        q[..., graph.mask] = -torch.expm1(-sigma)
    else:
        q = torch.exp(-s) * onehot - torch.expm1(-s) / graph.dim
    return q.log() - q.gather(-1, x_t[..., None]).log()


@pytest.mark.parametrize("sigma_value", [1e-3, 0.3, 0.5, 2.0, 12.0])
def test_uniform_score_entropy_is_nonnegative_and_zero_at_the_true_score(sigma_value):
    torch.manual_seed(2)
    N, B, L = 7, 16, 64
    graph = Uniform(N)
    x0 = torch.randint(0, N, (B, L))
    x_t = torch.where(torch.rand(B, L) < 0.5, x0, torch.randint(0, N, (B, L)))  # both x_t = x0 and x_t ≠ x0
    assert (x_t == x0).any() and (x_t != x0).any()
    sigma = torch.full((B, 1), sigma_value, dtype=torch.float64)
    random = graph.score_entropy(torch.randn(B, L, N, dtype=torch.float64) * 2, sigma, x_t, x0)
    assert (random >= -1e-9).all() and (random > 1e-3).any()
    true = _true_log_ratio(graph, sigma, x_t, x0)
    at_truth = graph.score_entropy(true, sigma, x_t, x0)
    scale = max(1.0, sigma_value, 1 / sigma_value)  # the terms cancel from magnitudes up to about 1/σ
    torch.testing.assert_close(at_truth, torch.zeros_like(at_truth), atol=1e-9 * scale, rtol=0)
    nudged = graph.score_entropy(true + 0.1 * torch.randn_like(true), sigma, x_t, x0)
    assert (nudged >= at_truth - 1e-12).all() and (nudged > 1e-6).any()  # the truth is the minimum

    # the absorbing graph's too (its terms live on masked positions only)
    absorbing = Absorbing(N)
    x_m = torch.where(torch.rand(B, L) < 0.5, x0, torch.full_like(x0, absorbing.mask))
    true = _true_log_ratio(absorbing, sigma, x_m, x0)
    torch.testing.assert_close(absorbing.score_entropy(true, sigma, x_m, x0), torch.zeros(B, L, dtype=torch.float64),
                               atol=1e-9 * scale, rtol=0)
    assert (absorbing.score_entropy(torch.randn(B, L, N + 1, dtype=torch.float64), sigma, x_m, x0) >= -1e-9).all()


def test_uniform_graph_trains_through_the_method():
    model = _random_model(9, "uniform", scale=0.05)  # free log-ratios: large random logits overflow exp
    assert model.config.time_conditioning and model.config.num_states == 9
    method = DiffusionMethod(graph="uniform")
    x0 = torch.randint(0, 9, (4, 12))
    batch = {"input_ids": x0, "target_mask": (torch.arange(12) >= 3)[None].expand(4, 12).long()}
    model.train()
    loss, _ = method.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="time_conditioning"):
        method.loss(_random_model(9, "uniform", time_conditioning=False), batch)


# ---- (6) the prompt is clamped ----

@pytest.mark.parametrize("graph_name, score_head", [("absorbing", "denoiser"), ("absorbing", "sedd"),
                                                     ("uniform", "denoiser")])
def test_samplers_never_change_the_prompt(graph_name, score_head):
    vocab, B, L = 10, 5, 16
    model = _random_model(vocab, graph_name)
    method = DiffusionMethod(graph=graph_name, score_head=score_head)
    graph = method.graph_for(model)
    prompt = torch.randint(0, vocab, (B, L))
    target = torch.arange(L)[None] >= torch.tensor([2, 4, 6, 8, 15])[:, None]  # prompts of different lengths
    for sampler in SAMPLERS:
        if sampler == "confidence" and not graph.absorbing:
            continue
        for greedy in (True, False):
            for steps in (1, 3, 20):
                seen = []
                out = sample(model, graph, method.schedule, prompt, target, steps=steps, sampler=sampler,
                             greedy=greedy, generator=torch.Generator().manual_seed(steps),
                             callback=lambda step, x, nfe: seen.append(x))
                for x in seen:  # after every step, not only at the end
                    assert torch.equal(x[~target], prompt[~target]), (sampler, greedy, steps)
                assert (out < vocab).all()  # no mask left, every state a token


# ---- (7) save_pretrained / from_pretrained ----

@pytest.mark.parametrize("time_conditioning, positions", [(False, "rotary"), (True, "rotary"), (True, "learned")])
def test_save_pretrained_round_trip(tmp_path, time_conditioning, positions):
    model = _random_model(15, "absorbing", time_conditioning=time_conditioning, positions=positions)
    model.save_pretrained(tmp_path)
    loaded = DiffusionTransformer.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, DiffusionTransformerConfig)
    saved, reread = model.config.to_dict(), loaded.config.to_dict()
    saved.pop("_name_or_path"), reread.pop("_name_or_path")
    assert reread == saved
    x = torch.randint(0, 16, (3, 17))
    sigma = torch.tensor([0.1, 1.0, 5.0])
    with torch.no_grad():
        assert torch.equal(model(x, sigma=sigma).logits, loaded(x, sigma=sigma).logits)
    # the job-file path: model.pretrained names the directory
    again = build_diffusion_lm(_model_cfg(pretrained=str(tmp_path)), 15, 64).eval()
    with torch.no_grad():
        assert torch.equal(model(x, sigma=sigma).logits, again(x, sigma=sigma).logits)
    with pytest.raises(ValueError, match="output states"):
        build_diffusion_lm(_model_cfg(pretrained=str(tmp_path)), 15, 64, graph="uniform")


def test_model_is_bidirectional_sigma_conditioned_and_respects_padding():
    x = torch.randint(0, 15, (2, 12))
    later = x.clone()
    later[:, -1] = (later[:, -1] + 1) % 15
    sigma = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        for tc in (False, True):
            model = _random_model(15, "absorbing", time_conditioning=tc)
            first = model(x, sigma=sigma).logits[:, 0]
            assert not torch.allclose(first, model(later, sigma=sigma).logits[:, 0])  # position 0 sees the last
            moved = model(x, sigma=sigma + 1).logits
            assert torch.allclose(model(x, sigma=sigma).logits, moved) != tc  # σ matters only when conditioned
        # padded key positions are invisible to the rest
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[:, 9:] = 0
        padded = model(x, sigma=sigma, attention_mask=mask).logits[:, :9]
        torch.testing.assert_close(padded, model(later, sigma=sigma, attention_mask=mask).logits[:, :9])
        torch.testing.assert_close(padded, model(x[:, :9], sigma=sigma).logits, rtol=1e-4, atol=1e-3)
        # adaLN-Zero and the zero head: a fresh model predicts uniformly whatever σ
        fresh = build_diffusion_lm(_model_cfg(), 15, 64, time_conditioning=True)
        assert (fresh(x, sigma=sigma).logits == 0).all()


# ---- the rest of the method ----

def test_samplers_follow_the_reverse_process_given_exact_scores():
    """With the exact scores of independent per-position data π, samplers must return draws from π (uniform
    graph), and the absorbing graph's reverse process must keep a fraction (1−eps)·t of tokens masked."""
    pi = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0]) + 1e-9
    pi = pi / pi.sum()

    class ExactScores(torch.nn.Module):
        def __init__(self, graph):
            super().__init__()
            self.graph = graph
            self.config = types.SimpleNamespace(time_conditioning=True, vocab_size=6, num_states=graph.dim)

        def forward(self, input_ids, sigma, attention_mask=None):
            B, L = input_ids.shape
            if self.graph.absorbing:  # the denoiser: p(x0 | x_t) = π
                return types.SimpleNamespace(logits=torch.cat([pi.log(), torch.zeros(1)]).expand(B, L, -1))
            s = sigma[:, None, None].float()
            p_t = (torch.exp(-s) * pi - torch.expm1(-s) / 6).expand(B, L, 6)
            return types.SimpleNamespace(logits=p_t.log() - p_t.gather(-1, input_ids[..., None]).log())

    prompt = torch.zeros(64, 64, dtype=torch.long)
    target = torch.ones(64, 64, dtype=torch.bool)
    uniform = Uniform(6)
    for sampler, steps in (("analytic", 32), ("analytic", 256), ("euler", 256)):
        x = sample(ExactScores(uniform), uniform, Geometric(), prompt, target, steps=steps, sampler=sampler,
                   generator=torch.Generator().manual_seed(1))
        freq = torch.bincount(x.flatten(), minlength=6).float() / x.numel()
        assert 0.5 * (freq - pi).abs().sum() < 0.03, (sampler, steps, freq)

    absorbing = Absorbing(6)
    ts = torch.linspace(1, 1e-5, 9)
    for sampler in ("analytic", "euler"):
        fractions = []
        x = sample(ExactScores(absorbing), absorbing, LogLinear(), prompt, target, steps=8, sampler=sampler,
                   generator=torch.Generator().manual_seed(1),
                   callback=lambda step, x, nfe: fractions.append((x == absorbing.mask).float().mean().item()))
        expected = ((1 - EPS) * ts[1:]).tolist()
        assert max(abs(a - b) for a, b in zip(fractions, expected)) < 0.02, (fractions, expected)
        freq = torch.bincount(x.flatten(), minlength=7).float() / x.numel()
        assert 0.5 * (freq[:6] - pi).abs().sum() < 0.03


def test_cached_sampling_skips_calls_but_not_results():
    vocab = 12
    model = _random_model(vocab, "absorbing")
    assert not model.config.time_conditioning  # time-agnostic: output depends on x alone
    graph = Absorbing(vocab)
    prompt = torch.randint(0, vocab, (3, 10))
    target = (torch.arange(10) >= 3)[None].expand(3, 10)
    runs = {}
    for cached in (True, False):
        model.config.time_conditioning = not cached  # the flag the sampler reads; the model ignores σ either way
        nfe = []
        out = sample(model, graph, LogLinear(), prompt, target, steps=200, sampler="analytic",
                     generator=torch.Generator().manual_seed(0), callback=lambda s, x, n: nfe.append(n))
        runs[cached] = (out, nfe[-1])
    model.config.time_conditioning = False
    assert torch.equal(runs[True][0], runs[False][0])
    # uncached: every step and the denoiser; cached: the first call, then one per step that changed x
    assert runs[False][1] == 201 and runs[True][1] <= 3 * 7 + 2


def test_encoding_marks_the_target_and_answers_extract_like_the_autoregressive_methods(memorized):
    tok, examples, eos = memorized.tok, memorized.examples, memorized.tok.eos_token
    for target, n_eos in (("cot", 2), ("answer", 1)):
        method = DiffusionMethod(target=target)
        seq_len = _seq_len(method, tok, examples) + 3
        batch = method.encode(examples, tok, seq_len)
        ids, mask = batch["input_ids"][0], batch["target_mask"][0].astype(bool)
        assert batch["attention_mask"].all()
        prompt_len = len(tok(method.prompt_text(examples[0], eos))["input_ids"])
        assert not mask[:prompt_len].any() and mask[prompt_len:].all()  # the EOS padding is target too
        assert tok.decode(ids[:prompt_len]) == f"{examples[0].prompt} {eos}"
        texts = method.decode_targets(tok, batch["input_ids"], batch["target_mask"])
        assert texts[0].count(eos) == n_eos + 3 and method.eos_in_target == n_eos
        assert [method.answer(t, eos) for t in texts] == [" ".join(e.answer.split()) for e in examples]
        no_answer = method.encode(examples, tok, seq_len, with_target=False)
        assert (no_answer["target_mask"] == batch["target_mask"]).all()
        assert (no_answer["input_ids"][no_answer["target_mask"] == 1] == tok.eos_token_id).all()


def test_multipass_passes_rebuild_the_chain():
    task = make_task(config_from_dict({"task": {"name": "multiplication", "a_digits": 4, "b_digits": 4}}).task)
    example = task.examples(0, 1)[0]
    thoughts = split_thoughts(example.cot)
    assert len(thoughts) == 4 and " ".join(thoughts) == example.cot
    assert split_thoughts("<<16-3-4=9>> <<9*2=18>>") == ["<<16-3-4=9>>", "<<9*2=18>>"]
    method = DiffusionMethod(multipass=True)
    assert method.eos_in_target == 1
    passes = [method.pass_texts(example, "E", j) for j in range(len(thoughts) + 1)]
    assert passes[0] == (f" {example.prompt} E", f" {thoughts[0]} E")
    assert passes[2][0] == f" {example.prompt} {thoughts[0]} {thoughts[1]} E"
    assert passes[-1][1] == f" #### {example.answer} E"
    assert method.answer(" " + " ".join([*thoughts, passes[-1][1].strip()]), "E") == example.answer


def test_multipass_model_writes_one_thought_per_pass(memorized):
    """DoT-MP end to end: trained on every pass of 4 examples, generation rebuilds chain and answer."""
    tok, eos = memorized.tok, memorized.tok.eos_token
    examples = memorized.examples[:4]
    method = DiffusionMethod(multipass=True, sampler="confidence", steps=8)
    pairs = [method.pass_texts(e, eos, j) for e in examples for j in range(len(split_thoughts(e.cot)) + 1)]
    assert len(pairs) == 12  # 2×2 chains: two partial products, then the answer
    batch = {k: torch.as_tensor(v) for k, v in
             method.encode_texts([p for p, _ in pairs] * 3, [t for _, t in pairs] * 3, tok, memorized.seq_len).items()}
    torch.manual_seed(0)
    model = build_diffusion_lm(_model_cfg(d_model=64), len(tok), memorized.seq_len)
    _train(model, method, batch)
    texts = method.generate_text(model, tok, examples, seq_len=memorized.seq_len)
    assert texts == [f" {e.cot} #### {e.answer} {eos}" for e in examples]
    assert [method.answer(t, eos) for t in texts] == [e.answer for e in examples]
    # the training stream picks one pass per example, a pure function of the example
    rows = method.encode(memorized.examples, tok, memorized.seq_len)
    assert (rows["input_ids"] == method.encode(memorized.examples, tok, memorized.seq_len)["input_ids"]).all()
    assert len({int(m.sum()) for m in rows["target_mask"]}) > 1  # different passes, different prompt lengths


def test_the_core_imports_neither_ray_nor_mlflow():
    code = ("import sys, reasonlab.methods.diffusion, reasonlab.models.diffusion, reasonlab.methods, reasonlab.loop, "
            "reasonlab.evaluate, reasonlab.analysis.internalization; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# ---- (10) the shared evaluator: diffusion decoding, self-consistency votes ----

def test_the_shared_evaluator_scores_diffusion_samples_by_exact_match(memorized):
    from reasonlab.evaluate import evaluate, vote

    m = memorized
    greedy = evaluate(m.model, m.tok, m.method, m.examples, batch_size=4, max_new_tokens=0, device=torch.device("cpu"),
                      seq_len=m.seq_len, steps=64)
    assert greedy.accuracy == 1.0 and greedy.num_examples == 8 and greedy.examples_per_sec > 0
    def voted(seed):
        return evaluate(m.model, m.tok, m.method, m.examples, batch_size=8, max_new_tokens=0,
                        device=torch.device("cpu"), seq_len=m.seq_len, steps=2, samples=3, seed=seed).predictions

    first, again = voted(5), voted(5)
    assert all(len(p["votes"]) == 3 and p["predicted"] == vote(p["votes"]) for p in first)
    assert [p["generated"] for p in first] == [p["generated"] for p in again]  # seeded: repeatable


def test_self_consistency_takes_the_most_frequent_answer():
    from reasonlab.evaluate import evaluate, vote
    from reasonlab.tasks import Example

    assert vote(["1 2", "3", "3", ""]) == "3" and vote(["", ""]) == ""
    assert vote(["4", "5", "5", "4"]) == "4"  # a tie goes to the answer drawn first

    class Drawn:  # each call "samples" the next answer of a fixed sequence
        eos_in_target, draws = 1, iter(["7", "9", "9", "9", "7"])

        def generate_text(self, model, tokenizer, examples, **kwargs):
            assert kwargs["sample"] is True and kwargs["generator"] is not None
            return [f" #### {next(self.draws)} <eos>" for _ in examples]

        def answer(self, generated, eos):
            return generated.split("####")[1].split(eos)[0].strip()

    class Tok:  # whitespace tokens: enough for counting generated tokens
        eos_token = "<eos>"

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    tok = Tok()
    model = torch.nn.Linear(1, 1)
    example = Example(prompt="1 * 9", cot="", answer="9")
    result = evaluate(model, tok, Drawn(), [example], batch_size=1, max_new_tokens=0, device=torch.device("cpu"),
                      seq_len=8, samples=5)
    assert result.predictions[0]["votes"] == ["7", "9", "9", "9", "7"]
    assert result.predictions[0]["predicted"] == "9" and result.accuracy == 1.0


def test_diffusion_models_are_sized_by_parameter_count_like_the_causal_ones():
    from reasonlab.config import ModelConfig
    from reasonlab.models.causal import count_parameters, size_for_params

    tok = build_tokenizer(make_task(config_from_dict({"task": {"name": "multiplication"}}).task))
    method = DiffusionMethod(graph="absorbing")
    cfg = ModelConfig(n_layer=2, n_params=300_000)
    d, heads = size_for_params(cfg, lambda m: method.build_model(m, tok, 64, torch.device("meta")))
    n = count_parameters(method.build_model(ModelConfig(n_layer=2, d_model=d, n_head=heads), tok, 64, None))
    per_head = count_parameters(method.build_model(ModelConfig(n_layer=2, d_model=d + 16, n_head=heads + 1), tok, 64,
                                                   None)) - n
    assert d % 16 == 0 and heads == d // 16 and abs(n - 300_000) <= per_head / 2 + 1


def test_greedy_draw_treats_negative_rates_as_zero_like_sampling():
    from reasonlab.methods.diffusion.sampler import draw

    n = 40_000
    probs = torch.tensor([0.5, 0.6, -0.3]).expand(n, 1, 3).contiguous()
    x = torch.zeros(n, 1, dtype=torch.long)
    greedy = draw(probs, x, True, torch.Generator().manual_seed(0))
    sampled = draw(probs, x, False, torch.Generator().manual_seed(1))
    assert set(greedy.unique().tolist()) == {0, 1}  # moves only to the best other state
    moved, expected = (greedy != 0).float().mean().item(), 0.6 / 1.1
    assert abs(moved - expected) < 0.01, moved  # 0.375 when the negative entry counted in the total
    assert abs((sampled != 0).float().mean().item() - expected) < 0.01
