"""One per-architecture accessor of a model's decoder blocks, and a way to read or rewrite the hidden
state entering each of them. Methods that read a teacher's states or substitute states (ICoT-KD) and
probes go through these, never through copied forward passes: the model's own forward runs unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ordered blocks of a GPT-2, a Llama (and the other `model.layers` decoders of transformers) or
    the diffusion transformer. Block l's input is the `hidden_states[l]` transformers reports."""
    found = _first_at(model, ("transformer.h", "model.layers", "blocks"), nn.ModuleList)
    if found is not None:
        return found
    raise TypeError(f"{type(model).__name__}: no decoder blocks found (expected transformer.h, model.layers or "
                    f"blocks)")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block and the output layer of a GPT-2 or a Llama: with the output layer, what
    the logit lens reads every layer's state through. (The diffusion transformer's is conditioned on the noise
    level, so no state reads out without one.)"""
    found = _first_at(model, ("transformer.ln_f", "model.norm"), nn.Module)
    if found is not None:
        return found
    raise TypeError(f"{type(model).__name__}: no unconditioned final norm (expected transformer.ln_f or "
                    f"model.norm); the logit lens reads causal language models")


def _first_at(model: nn.Module, paths: tuple[str, ...], kind: type) -> nn.Module | None:
    """The first of the dotted attribute `paths` under `model` that exists and is a `kind`."""
    for path in paths:
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, kind):
            return node
    return None


@contextlib.contextmanager
def block_inputs(model: nn.Module, edit: Callable[[int, torch.Tensor], torch.Tensor | None]):
    """While active, `edit(l, hidden)` sees the hidden state entering block l ([batch, length, d]) before
    the block runs; what it returns (if not None) enters the block instead. Every block of the supported
    architectures takes the hidden state as its first positional argument."""
    def hook(layer: int):
        def pre_hook(module, args):
            new = edit(layer, args[0])
            return None if new is None else (new, *args[1:])
        return pre_hook

    handles = [block.register_forward_pre_hook(hook(i)) for i, block in enumerate(decoder_blocks(model))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def replace_at(hidden: torch.Tensor, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """`hidden` with row b's state at `positions[b]` replaced by `states[b]`, differentiable in both."""
    at = torch.nn.functional.one_hot(positions, hidden.shape[1]).bool()[..., None]  # [batch, length, 1]
    return torch.where(at, states[:, None, :].to(hidden.dtype), hidden)


def take_at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Row b's state at `positions[b]`: [batch, d]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
