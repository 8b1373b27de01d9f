"""Reverse-process samplers: T steps from the limit distribution to clean text, the prompt clamped.

Clamping the prompt after every step is SEDD's `proj_fun` conditioning, which DoT reuses for the
question: the model is never asked to keep the prompt, it is simply written back.

- `analytic`: SEDD's Tweedie τ-leaping step, exact for the absorbing graph (it equals MDLM's ddpm and
  MD4's ancestral step), then SEDD's final denoising step that removes the remaining noise σ(t_min).
- `euler`: first-order τ-leaping on the reverse rates, then the same final denoising step.
- `confidence`: absorbing graph only. Each step predicts every masked position and unmasks the most
  confident ones (LLaDA's low-confidence remasking, MGDM's easy-first), spreading the target's
  tokens evenly over the T steps: with T equal to the target length, one token per step.

`greedy=True` makes the decoding choices deterministic: which token a position becomes is the argmax.
Whether it moves at a given step stays random for analytic/euler (that is the schedule's job; an
argmax there would keep every mask until the last step), and the final denoising step is a full argmax.
The confidence sampler is fully deterministic when greedy.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from reasonlab.methods.diffusion.graph import Graph, sample_categorical
from reasonlab.methods.diffusion.schedule import Schedule

SAMPLE_EPS = 1e-5  # the reverse process stops at t = SAMPLE_EPS, then denoises (SEDD)
SAMPLERS = ("analytic", "euler", "confidence")


class Denoiser:
    """The model as a sampler calls it: float logits for x at noise σ, and a count of evaluations.

    A time-agnostic model (no time conditioning) is a function of x alone, so when no position changed
    since the last call its output is reused (MDLM's ddpm_cache): with many steps most steps change
    nothing and cost no forward pass.
    """

    def __init__(self, model, attention_mask: torch.Tensor | None = None) -> None:
        self.model = model
        self.attention_mask = attention_mask
        self.time_agnostic = not getattr(model.config, "time_conditioning", False)
        self.calls = 0
        self._x: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.time_agnostic and self._x is not None and torch.equal(x, self._x):
            return self._logits
        out = self.model(input_ids=x, sigma=sigma, attention_mask=self.attention_mask)
        self._x, self._logits = x, out.logits.float()
        self.calls += 1
        return self._logits


def draw(probs: torch.Tensor, x: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """The next state from unnormalised transition probabilities [B, L, dim] out of states x."""
    if not greedy:
        return sample_categorical(probs, generator)
    probs = probs.clamp(min=0)  # a negative rate is no move, as in sample_categorical's race
    stay = probs.gather(-1, x[..., None]).squeeze(-1)
    total = probs.sum(dim=-1)
    move = torch.rand(x.shape, generator=generator, device=x.device, dtype=probs.dtype) * total < total - stay
    best = probs.scatter(-1, x[..., None], -torch.inf).argmax(dim=-1)
    return torch.where(move, best, x)


def _scores(graph, denoiser, x, sigma):
    return graph.log_score(denoiser(x, sigma), sigma[:, None], x).exp()


def analytic_step(graph: Graph, schedule: Schedule, denoiser: Denoiser, x, t, dt, greedy, generator):
    sigma = schedule.total(t)
    dsigma = (sigma - schedule.total(t - dt))[:, None]
    probs = graph.staggered_score(_scores(graph, denoiser, x, sigma.float()), dsigma.float())
    probs = probs * graph.transp_transition(x, dsigma.float())
    return draw(probs, x, greedy, generator)


def euler_step(graph: Graph, schedule: Schedule, denoiser: Denoiser, x, t, dt, greedy, generator):
    sigma, rate = schedule(t)
    reverse = graph.reverse_rate(x, _scores(graph, denoiser, x, sigma.float()))
    probs = F.one_hot(x, graph.dim).float() + (dt * rate).float()[:, None, None] * reverse
    # a large step can push the probability of staying below 0: then every position moves
    return draw(probs.clamp(min=0), x, greedy, generator)


def denoise_step(graph: Graph, schedule: Schedule, denoiser: Denoiser, x, t, greedy, generator):
    """Remove all remaining noise σ(t): an analytic step of size σ(t), never landing on the mask."""
    sigma = schedule.total(t).float()
    probs = graph.staggered_score(_scores(graph, denoiser, x, sigma), sigma[:, None])
    probs = probs * graph.transp_transition(x, sigma[:, None])
    if graph.absorbing:
        probs = probs[..., : graph.mask]  # every masked position is filled
    return probs.argmax(dim=-1) if greedy else sample_categorical(probs, generator)


PREDICTORS = {"analytic": analytic_step, "euler": euler_step}


def unmask_counts(n: torch.Tensor, steps: int, step: int) -> torch.Tensor:
    """Tokens to unmask at `step` so that n tokens are spread evenly over `steps` (per row)."""
    return (n * (step + 1)) // steps - (n * step) // steps


def confidence_step(graph: Graph, schedule: Schedule, denoiser: Denoiser, x, t, k, target, greedy, generator):
    """Unmask the k (per row) most confident masked target positions with their predicted tokens."""
    masked = (x == graph.mask) & target
    log_p = graph.denoiser_log_probs(denoiser(x, schedule.total(t).float()))
    if greedy:
        confidence, token = log_p.max(dim=-1)
    else:
        token = sample_categorical(log_p.exp(), generator)
        confidence = log_p.gather(-1, token[..., None]).squeeze(-1)
    confidence = confidence.masked_fill(~masked, -torch.inf)
    rank = confidence.argsort(dim=-1, descending=True).argsort(dim=-1)
    chosen = masked & (rank < k[:, None])
    return torch.where(chosen, token, x)


@torch.no_grad()
def sample(model, graph: Graph, schedule: Schedule, prompt_ids: torch.Tensor, target: torch.Tensor, *,
           steps: int, sampler: str = "analytic", greedy: bool = False, denoise: bool = True,
           eps: float = SAMPLE_EPS, attention_mask: torch.Tensor | None = None,
           generator: torch.Generator | None = None,
           callback: Callable[[int, torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """Sequences [B, L] whose `target` positions are generated and whose other positions are
    `prompt_ids`, unchanged.

    `callback(step, x, nfe)` runs after every step (the final denoising step is step `steps`), with
    the number of model evaluations so far.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if sampler == "confidence" and not graph.absorbing:
        raise ValueError("the confidence sampler unmasks tokens: it needs the absorbing graph")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    target = target.bool()
    B, device = prompt_ids.shape[0], prompt_ids.device

    def clamp(x):
        return torch.where(target, x, prompt_ids)

    x = clamp(graph.sample_limit(prompt_ids.shape, device, generator))
    denoiser = Denoiser(model, attention_mask)
    # the time grid in float64: σ(t) − σ(t − dt) loses digits in float32 near t = 1
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float64, device=device)
    dt = (1 - eps) / steps
    n_target = target.sum(dim=1)
    for i in range(steps):
        t = ts[i].expand(B)
        if sampler == "confidence":
            k = unmask_counts(n_target, steps, i)
            if bool(k.any()):  # a step that unmasks nothing needs no model call
                x = clamp(confidence_step(graph, schedule, denoiser, x, t, k, target, greedy, generator))
        else:
            x = clamp(PREDICTORS[sampler](graph, schedule, denoiser, x, t, dt, greedy, generator))
        if callback is not None:
            callback(i, x, denoiser.calls)
    if denoise and sampler != "confidence":  # confidence sampling leaves no noise behind
        x = clamp(denoise_step(graph, schedule, denoiser, x, ts[-1].expand(B), greedy, generator))
        if callback is not None:
            callback(steps, x, denoiser.calls)
    return x
