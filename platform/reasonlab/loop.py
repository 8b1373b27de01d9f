"""The training step and its state, without Ray: the Ray worker, the benchmarks and the core tests all
train through `TrainLoop`, so there is one step to read and to fix.

The method's loss is the forward of `MethodModule`, the module DDP wraps: whatever parts of the model
a loss calls (a packed-question loss runs the output layer on answer positions only), it runs inside
DDP's forward, and no method needs a DDP branch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch

from reasonlab.evaluate import autocast_context


def lr_factor(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio at max_steps (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and other 1-d parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=torch.cuda.is_available())


class MethodModule(torch.nn.Module):
    """The trained model with its method's loss as forward: `module(batch) -> (loss, metrics)`."""

    def __init__(self, model: torch.nn.Module, method) -> None:
        super().__init__()
        self.model = model
        self.method = method  # not a module: frozen inputs a method holds (a teacher) stay untrained

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.method.loss(self.model, batch)


class TrainLoop:
    """Model, AdamW, the LR schedule, gradient accumulation, clipping, autocast and `torch.compile` of one run.

    `wrap` turns the loss module into what runs it (Ray Train's `prepare_model`: DDP across workers);
    `self.model` stays the bare model, which evaluation, saving and checkpoints use.
    """

    def __init__(self, model: torch.nn.Module, method, cfg, device: torch.device,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> None:
        self.model, self.method, self.cfg, self.device = model, method, cfg, device
        module = MethodModule(model, method)
        self.module = wrap(module) if wrap else module
        self.distributed = isinstance(self.module, torch.nn.parallel.DistributedDataParallel)
        if cfg.compile:
            # in place (Module.compile), so the loop keeps DDP's no_sync and everything holding `model` (the
            # evaluator, saving) runs the compiled forward too
            self.module.compile()
            model.compile()
        self.optimizer = make_optimizer(model, cfg)
        self.grad_ema: dict[str, torch.Tensor] = {}  # Grokfast's slow gradient (train.grad_filter=ema)
        self.step = 0  # optimizer steps done
        self.resets: list[int] = []  # steps after which the optimizer was rebuilt (this process)

    @property
    def lr(self) -> float:
        """The learning rate of the next step: the schedule's, times the method's factor."""
        return self.cfg.lr * lr_factor(self.step, self.cfg) * self.method.lr_scale(self.step)

    def reset_optimizer(self) -> None:
        """A fresh AdamW (zero moments), as stepwise internalization does when it removes a token."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.resets.append(self.step)

    def train_step(self, micro_batches: Iterable[dict]) -> tuple[torch.Tensor, dict]:
        """One optimizer step over `train.grad_accum` micro-batches → (mean loss, mean metrics), both
        still on the device (reading them would stall a GPU)."""
        self.model.train()
        n = self.cfg.grad_accum
        total, metrics = None, {}
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            sync = self.module.no_sync() if self.distributed and not last else contextlib.nullcontext()
            with sync, autocast_context(self.device, self.cfg.precision):
                loss, extra = self.module(batch)
            (loss / n).backward()
            total = loss.detach() if total is None else total + loss.detach()
            for k, v in extra.items():
                metrics[k] = metrics.get(k, 0) + v / n
        if total is None:
            raise ValueError("train_step got no micro-batches")
        if self.cfg.grad_filter == "ema":
            self.filter_gradients()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.method.on_step(self.step, self)
        return total / n, metrics

    @torch.no_grad()
    def filter_gradients(self) -> None:
        """Grokfast-EMA (Lee et al. 2024): ema ← α·ema + (1 − α)·g, then g ← g + λ·ema, before clipping."""
        alpha, lam = self.cfg.grad_filter_alpha, self.cfg.grad_filter_lambda
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            ema = self.grad_ema.get(name)
            if ema is None:  # the first gradient starts the average (as the reference implementation does)
                self.grad_ema[name] = ema = p.grad.detach().clone()
            else:
                ema.mul_(alpha).add_(p.grad, alpha=1 - alpha)
            p.grad.add_(ema, alpha=lam)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "rng": torch.get_rng_state(), "grad_ema": self.grad_ema}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        self.grad_ema = {k: v.to(self.device) for k, v in state.get("grad_ema", {}).items()}
