"""What the benchmark scripts share: one optimizer step of the core's training loop, without Ray."""
from __future__ import annotations

import torch

from reasonlab.evaluate import autocast_context


def plain_step(method, model, batch: dict, optimizer, scheduler, grad_clip: float, device: torch.device,
               precision: str = "auto") -> torch.Tensor:
    """Loss, backward, clipping, AdamW and the LR schedule for one batch; returns the loss (on device)."""
    with autocast_context(device, precision):
        loss = method.loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
