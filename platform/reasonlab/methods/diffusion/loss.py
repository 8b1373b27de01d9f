"""The training objective: noise the target, score the model's reverse process on it.

SEDD's loss is the denoising score entropy weighted by σ'(t). For the absorbing graph with the
normalised (denoiser) head it collapses to MDLM's weighted cross-entropy on masked tokens,
σ'(t)/(e^{σ(t)} − 1) · (−log p(x0 | x_t)) for any schedule, which is (1/t)·CE for the log-linear one:
the two forms are the same number (tested); the second is cheaper and needs no score algebra.

Following Diffusion of Thoughts (fix_src), only target positions are noised; the prompt stays clean
and, since only noised positions carry a term, it carries no loss.
"""
from __future__ import annotations

import torch

from reasonlab.methods.diffusion.graph import Absorbing, Graph, expm1_sigma
from reasonlab.methods.diffusion.schedule import Schedule

T_EPS = 1e-3  # t ∈ [T_EPS, 1]: at t → 0 the weights σ'/(e^σ − 1) ≈ 1/t blow up


def sample_times(batch: int, device, *, antithetic: bool = True, eps: float = T_EPS,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One t per sequence in [eps, 1]. Antithetic (MDLM): one uniform offset, then evenly spaced,
    so every batch covers the whole noise range and the loss has less variance."""
    if antithetic:
        u = torch.rand(1, generator=generator, device=device)
        u = (u / batch + torch.arange(batch, device=device) / batch) % 1
    else:
        u = torch.rand(batch, generator=generator, device=device)
    return (1 - eps) * u + eps


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Score algebra in fp32 or better: bf16 logits (autocast) lose the small weights' precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def perturb(graph: Graph, schedule: Schedule, x0: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
            generator: torch.Generator | None = None):
    """x_t ~ q_t(· | x0) on target positions only; returns x_t, σ(t) and σ'(t) (each [B])."""
    sigma, dsigma = schedule(t)
    return graph.sample_transition(x0, sigma[:, None], maskable=target, generator=generator), sigma, dsigma


def score_entropy_terms(graph: Graph, logits: torch.Tensor, sigma: torch.Tensor, dsigma: torch.Tensor,
                        x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """σ'(t) · score entropy per position, [B, L] (SEDD)."""
    log_score = graph.log_score(at_least_fp32(logits), sigma[:, None], x_t)
    return dsigma[:, None] * graph.score_entropy(log_score, sigma[:, None], x_t, x0)


def weighted_ce_terms(graph: Absorbing, logits: torch.Tensor, sigma: torch.Tensor, dsigma: torch.Tensor,
                      x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """σ'(t)/(e^σ − 1) · (−log p(x0 | x_t)) on masked positions, 0 elsewhere, [B, L] (MDLM)."""
    log_p = graph.denoiser_log_probs(at_least_fp32(logits))
    nll = -log_p.gather(-1, x0[..., None]).squeeze(-1)
    weight = dsigma / expm1_sigma(sigma)
    return torch.where(x_t == graph.mask, weight[:, None] * nll, torch.zeros_like(nll))


def reduce(terms: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """"sum": summed over each sequence's target, averaged over sequences (SEDD's ELBO per sequence);
    "mean": averaged over all target tokens (MDLM, LLaDA SFT), comparable to a per-token CE."""
    terms = terms * target
    if reduction == "sum":
        return terms.sum(dim=1).mean()
    if reduction == "mean":
        return terms.sum() / target.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'sum' or 'mean'")


def resolve_form(form: str, graph: Graph, schedule: Schedule) -> str:
    """"auto": the weighted cross-entropy where it equals the score entropy (absorbing graph, normalised
    head, any schedule), else the score entropy."""
    exact = isinstance(graph, Absorbing) and graph.normalized
    if form == "auto":
        return "mdlm" if exact else "score_entropy"
    if form == "mdlm" and not exact:
        raise ValueError("the weighted cross-entropy form needs the absorbing graph with its normalised head")
    if form not in ("mdlm", "score_entropy"):
        raise ValueError(f"unknown loss form {form!r}; expected 'auto', 'mdlm' or 'score_entropy'")
    return form


def diffusion_loss(model, graph: Graph, schedule: Schedule, x0: torch.Tensor, target: torch.Tensor, *,
                   form: str = "auto", reduction: str = "sum", antithetic: bool = True,
                   attention_mask: torch.Tensor | None = None, t: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A scalar loss for clean sequences x0 [B, L] whose `target` positions [B, L] (bool) are generated."""
    target = target.bool()
    if t is None:
        t = sample_times(x0.shape[0], x0.device, antithetic=antithetic, generator=generator)
    x_t, sigma, dsigma = perturb(graph, schedule, x0, target, t, generator)
    logits = model(input_ids=x_t, sigma=sigma, attention_mask=attention_mask).logits
    terms_fn = weighted_ce_terms if resolve_form(form, graph, schedule) == "mdlm" else score_entropy_terms
    return reduce(terms_fn(graph, logits, sigma, dsigma, x_t, x0), target, reduction)
