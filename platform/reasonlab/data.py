"""Ray Data pipelines over tasks: the training stream, generated and tokenized inside Ray Data.

Row i of the stream packs examples i·p … i·p + p − 1 of `task.examples` (p = 1 unless the method
packs), so a run restarted at step k builds the stream from row k · batch_size on and sees exactly
the examples it had not trained on yet.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import ray.data

BATCH_ROWS = 1024  # examples generated per call; blocks of this size stream to the trainers
MAX_BLOCKS = 256  # index-range blocks; more only adds scheduling overhead (ray_and_mlflow.md §2.1)

_encoders: dict[str, tuple] = {}


def _encoder(spec: dict):
    """(task, method, tokenizer, seq_len) for a spec, built once per Ray worker process."""
    key = spec["encoder_key"]
    if key not in _encoders:
        # imported here, not with the module: Ray Data's split coordinator unpickles the pipeline, which names
        # this module, and never encodes; the methods bring torch and transformers, about 4 s of its start-up
        from reasonlab.config import config_from_dict
        from reasonlab.methods import make_method
        from reasonlab.tasks import make_task
        from reasonlab.tokenizer import tokenizer_from_files

        cfg = config_from_dict(spec["config"])
        task, method = make_task(cfg.task), make_method(cfg.method, cfg)
        tokenizer = tokenizer_from_files(spec["tokenizer"])
        method.setup(task, tokenizer)
        _encoders[key] = (task, method, tokenizer, spec["seq_len"])
    return _encoders[key]


def encode_range(spec: dict, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows start..stop-1 of the training stream, tokenized and padded, with their indices. A row packs
    `method.examples_per_row` consecutive examples."""
    task, method, tokenizer, seq_len = _encoder(spec)
    k = method.examples_per_row
    batch = method.encode(task.examples(start * k, stop * k), tokenizer, seq_len,
                          indices=np.arange(start * k, stop * k, dtype=np.int64))
    batch["index"] = np.arange(start, stop, dtype=np.int64)
    return batch


def _generate(batch: dict[str, np.ndarray], spec: dict):
    """Each row [start, stop) of `batch` as tokenized batches of at most BATCH_ROWS rows, in order."""
    for start, stop in zip(batch["start"].tolist(), batch["stop"].tolist()):
        for lo in range(start, stop, BATCH_ROWS):
            yield encode_range(spec, lo, min(stop, lo + BATCH_ROWS))


def train_dataset(spec: dict, start: int, stop: int, tasks: int = 1) -> ray.data.Dataset:
    """Examples start..stop-1, generated and tokenized by at most `tasks` Ray Data tasks at once (nothing built on
    the driver but the index ranges).

    The tasks reserve no CPU. Ray Data budgets CPUs by what Ray's AutoscalingCoordinator reserves to it, and a
    Train run stopped uncleanly (killed, a trial a sweep stopped) keeps its reservation there for 180 s, as does
    every concurrent run: on a small cluster that budget is often 0, and tasks that need a CPU then never start
    once the first blocks wait for the trainer (ray_and_mlflow.md §2.3). So the ranges are items, not a
    `range()` whose read tasks take a CPU each, and `tasks` bounds the generators instead."""
    import ray.data  # here, so the encoder above runs without Ray (GPU checks, benchmarks)

    n = stop - start
    blocks = max(1, min(MAX_BLOCKS, math.ceil(n / BATCH_ROWS)))
    edges = [start + n * i // blocks for i in range(blocks + 1)]
    ranges = [{"start": lo, "stop": hi} for lo, hi in zip(edges[:-1], edges[1:])]
    return ray.data.from_items(ranges, override_num_blocks=blocks).map_batches(
        _generate, fn_kwargs={"spec": spec}, batch_size=1, batch_format="numpy", num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=max(1, tasks)))
