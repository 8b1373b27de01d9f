"""Noise schedules σ(t) for t ∈ [0, 1]: the total noise σ(t) and its rate σ'(t) (SEDD's noise_lib).

A token survives the forward process up to time t with probability e^{−σ(t)}. Plain classes: there
is nothing to learn, so nothing needs to sit in the optimizer or be wrapped by DDP.
"""
from __future__ import annotations

import math

import torch


class Schedule:
    name = ""

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t)."""
        raise NotImplementedError

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """σ'(t) = dσ/dt."""
        raise NotImplementedError

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total(t), self.rate(t)


class LogLinear(Schedule):
    """σ(t) = −log(1 − (1−eps)·t): the masked fraction 1 − e^{−σ} = (1−eps)·t grows linearly in t.

    The absorbing graph's schedule (SEDD, MDLM). eps keeps σ(1) finite (a 0.999 mask rate at t=1).
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps

    def total(self, t):
        return -torch.log1p(-(1 - self.eps) * t)  # log1p: exact near t = 0, where σ ≈ t

    def rate(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)


class Geometric(Schedule):
    """σ(t) = σ_min^(1−t) · σ_max^t: the uniform graph's schedule in SEDD (σ_min=1e-4, σ_max=20)."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def total(self, t):
        return self.sigma_min ** (1 - t) * self.sigma_max ** t

    def rate(self, t):
        return self.total(t) * (math.log(self.sigma_max) - math.log(self.sigma_min))


SCHEDULES = {"loglinear": LogLinear, "geometric": Geometric}


def make_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]()
