"""Forward processes ("graphs", SEDD's graph_lib): continuous-time Markov chains over token states.

`Absorbing` moves each token to a mask state at rate 1; `Uniform` moves it to a uniformly random token.
Shapes: states i, x_t, x0 are [B, L] integer tensors; σ is [B, 1] (broadcast over positions); scores
are ratios s_j ≈ p_t(j) / p_t(x_t) over the `dim` states, [B, L, dim].

Each graph also owns its score parameterisation (`log_score`: model logits → log ratios), because the
right head depends on the process: the absorbing graph's ratios follow from a normalised denoiser
p(x0 | x_t) (MDLM), while the uniform graph's are free outputs (SEDD).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expm1_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """e^σ − 1 as SEDD computes it: expm1 for small σ, where exp(σ) − 1 loses precision."""
    return torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of unnormalised probabilities (exponential race): argmax_i p_i / E_i with
    E_i ~ Exp(1) picks i with probability p_i / Σ_j p_j, so rows need not sum to 1."""
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    exponential = 1e-10 - (u + 1e-10).log()
    return (probs / exponential).argmax(dim=-1)


class Graph:
    dim: int  # number of states
    absorbing: bool

    def transp_rate(self, i: torch.Tensor) -> torch.Tensor:
        """Row i of the forward rate matrix's transpose, [.., dim]."""
        raise NotImplementedError

    def transp_transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """q_σ(i | j) for every state j: how likely each state is to have moved into i, [.., dim]."""
        raise NotImplementedError

    def sample_transition(self, i: torch.Tensor, sigma: torch.Tensor, maskable: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t ~ q_σ(· | i); positions where `maskable` is False are left clean (the prompt)."""
        raise NotImplementedError

    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        """exp(dσ·Q) applied to the score: the ratios dσ earlier in the forward process."""
        raise NotImplementedError

    def sample_limit(self, shape, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the process at σ = ∞, where the reverse process starts."""
        raise NotImplementedError

    def log_score(self, logits: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Model logits → log ratios log s_j, with log s_{x_t} = 0 (a state's ratio to itself)."""
        raise NotImplementedError

    def score_entropy(self, log_score: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor,
                      x0: torch.Tensor) -> torch.Tensor:
        """Denoising score entropy per position, [B, L]: ≥ 0, and 0 at the true ratios q(j|x0)/q(x_t|x0)."""
        raise NotImplementedError

    def reverse_rate(self, i: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Rates of the reverse chain out of state i: transp_rate · score, diagonal = −(row sum)."""
        rate = self.transp_rate(i).to(score.dtype) * score
        rate = rate.scatter(-1, i[..., None], 0.0)
        return rate.scatter(-1, i[..., None], -rate.sum(dim=-1, keepdim=True))


class Absorbing(Graph):
    """Tokens 0..vocab_size−1 plus a mask state `vocab_size`; each token is masked at rate 1.

    `normalized=True` parameterises the score through a denoiser p(x0 | x_t) (MDLM's SUBS head; the
    score entropy then equals a weighted cross-entropy). `normalized=False` is SEDD's free head,
    log s = logits − log(e^σ − 1) − log(dim − 1), which starts at the right total ratio.
    """

    absorbing = True

    def __init__(self, vocab_size: int, normalized: bool = True) -> None:
        self.vocab_size = vocab_size
        self.dim = vocab_size + 1
        self.mask = vocab_size
        self.normalized = normalized

    def transp_rate(self, i):
        edge = -F.one_hot(i, self.dim).float()
        edge[i == self.mask] += 1  # the mask state came from any token
        return edge

    def transp_transition(self, i, sigma):
        stay = torch.exp(-sigma)[..., None] * F.one_hot(i, self.dim).to(sigma.dtype)
        moved = torch.where(i == self.mask, -torch.expm1(-sigma), torch.zeros_like(sigma))  # 1 − e^{−σ}
        return stay + moved[..., None]

    def sample_transition(self, i, sigma, maskable=None, generator=None):
        move = torch.rand(i.shape, generator=generator, device=i.device) < -torch.expm1(-sigma)
        if maskable is not None:
            move &= maskable.bool()
        return torch.where(move, torch.full_like(i, self.mask), i)

    def staggered_score(self, score, dsigma):
        extra = -torch.expm1(dsigma) * score.sum(dim=-1)  # (1 − e^{dσ}) Σ_j s_j, the sum including the mask
        score = score * dsigma.exp()[..., None]
        score[..., self.mask] += extra
        return score

    def sample_limit(self, shape, device, generator=None):
        return torch.full(shape, self.mask, dtype=torch.long, device=device)

    def log_score(self, logits, sigma, x_t):
        if self.normalized:
            # s_j = p(x0=j | x_t)·e^{−σ}/(1 − e^{−σ}) = p_j/(e^σ − 1); the denoiser never predicts the mask
            logits = logits.clone()
            logits[..., self.mask] = -math.inf
            log_s = logits.log_softmax(dim=-1) - torch.log(expm1_sigma(sigma))[..., None]
        else:
            log_s = logits - torch.log(expm1_sigma(sigma))[..., None] - math.log(self.dim - 1)
        return log_s.scatter(-1, x_t[..., None], 0.0)

    def denoiser_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """log p(x0 | x_t) over the tokens (the mask excluded): what the normalised head predicts."""
        return logits[..., : self.vocab_size].log_softmax(dim=-1)

    def score_entropy(self, log_score, sigma, x_t, x0):
        # Only masked positions carry a term: an unmasked token is certain and its entropy is 0.
        masked = x_t == self.mask
        ls = log_score[masked]  # [M, dim]
        r = 1 / expm1_sigma(sigma.expand_as(x_t)[masked])  # the true ratio p_t(x0)/p_t(mask)
        neg = r * ls.gather(-1, x0[masked][:, None]).squeeze(-1)
        pos = ls[:, : self.mask].exp().sum(dim=-1)
        const = r * (r.log() - 1)
        out = torch.zeros(x_t.shape, dtype=log_score.dtype, device=log_score.device)
        out[masked] = pos - neg + const
        return out


class Uniform(Graph):
    """N token states; at rate 1 a token is replaced by a uniform draw (which may be itself)."""

    absorbing = False

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.dim = vocab_size

    def transp_rate(self, i):
        return 1 / self.dim - F.one_hot(i, self.dim).float()  # symmetric: rate = transp_rate

    def transp_transition(self, i, sigma):
        stay = torch.exp(-sigma)[..., None] * F.one_hot(i, self.dim).to(sigma.dtype)
        return stay + (-torch.expm1(-sigma) / self.dim)[..., None]

    def sample_transition(self, i, sigma, maskable=None, generator=None):
        move = torch.rand(i.shape, generator=generator, device=i.device) < -torch.expm1(-sigma)
        if maskable is not None:
            move &= maskable.bool()
        drawn = torch.randint(0, self.dim, i.shape, generator=generator, device=i.device)
        return torch.where(move, drawn, i)

    def staggered_score(self, score, dsigma):
        # ((e^{−dσ} − 1) / (N e^{−dσ})) Σ_j s_j + s / e^{−dσ}
        extra = torch.expm1(-dsigma) / (self.dim * torch.exp(-dsigma))
        return score * dsigma.exp()[..., None] + (extra * score.sum(dim=-1))[..., None]

    def sample_limit(self, shape, device, generator=None):
        return torch.randint(0, self.dim, shape, generator=generator, device=device)

    def log_score(self, logits, sigma, x_t):
        return logits.scatter(-1, x_t[..., None], 0.0)

    def score_entropy(self, log_score, sigma, x_t, x0):
        N = self.dim
        esm1 = expm1_sigma(sigma).expand_as(x_t).to(log_score.dtype)
        ratio = 1 - N / (esm1 + N)  # the true ratio q(j|x0)/q(x0|x0) for j ≠ x0
        ls_x = log_score.gather(-1, x_t[..., None]).squeeze(-1)
        ls_x0 = log_score.gather(-1, x0[..., None]).squeeze(-1)
        clean = x_t == x0
        neg = log_score.mean(dim=-1) - ls_x / N
        neg = torch.where(clean, ratio * neg, ls_x0 / esm1 + neg)
        const = torch.where(clean, (N - 1) / N * ratio * (ratio.log() - 1),
                            ((-ratio.log() - 1) / ratio - (N - 2)) / N)
        pos = log_score.exp().mean(dim=-1) - ls_x.exp() / N
        return pos - neg + const


def make_graph(name: str, vocab_size: int, score_head: str = "denoiser") -> Graph:
    """`score_head` (absorbing only): "denoiser" (MDLM's normalised head) or "sedd" (SEDD's free head)."""
    if score_head not in ("denoiser", "sedd"):
        raise ValueError(f"unknown score head {score_head!r}; expected 'denoiser' or 'sedd'")
    if name == "absorbing":
        return Absorbing(vocab_size, normalized=score_head == "denoiser")
    if name == "uniform":
        return Uniform(vocab_size)
    raise ValueError(f"unknown graph {name!r}; expected 'absorbing' or 'uniform'")
