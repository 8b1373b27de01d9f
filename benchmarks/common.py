"""What the benchmark scripts share: a job's model and method built as a run builds them, and batches of
its training stream, for the core's TrainLoop (the step every run takes), without Ray."""
from __future__ import annotations

import torch

from reasonlab.data import encode_range
from reasonlab.methods import make_method
from reasonlab.tasks import make_task
from reasonlab.tokenizer import tokenizer_from_files
from reasonlab.train import prepare_run


def build_run(cfg, device: torch.device):
    """(spec, tokenizer, task, method, model) of a job, seeded like a run."""
    spec = prepare_run(cfg)
    tokenizer = tokenizer_from_files(spec["tokenizer"])
    task, method = make_task(cfg.task), make_method(cfg.method, cfg)
    method.setup(task, tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = method.build_model(cfg.model, tokenizer, spec["max_len"], device)
    return spec, tokenizer, task, method, model


def stream_batch(spec: dict, step: int, rows: int, device: torch.device | None = None) -> dict:
    """Rows step·rows … (step+1)·rows − 1 of the training stream, as tensors."""
    return {k: torch.from_numpy(v).to(device or "cpu", non_blocking=True)
            for k, v in encode_range(spec, step * rows, (step + 1) * rows).items()}
