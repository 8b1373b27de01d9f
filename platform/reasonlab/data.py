"""Ray Data pipelines over tasks: the training stream, generated and tokenized inside Ray Data.

Row i of the stream packs examples i·p … i·p + p − 1 of `task.examples` (p = 1 unless the method
packs), so a run restarted at step k builds the stream from row k · batch_size on and sees exactly
the examples it had not trained on yet.
"""
from __future__ import annotations

import json
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


def resumed_train_dataset(spec: dict, storage: str, run_name: str, batch_size: int, total: int,
                          tasks: int) -> ray.data.Dataset:
    """The stream of a run's `total` examples from where its last registered checkpoint left it."""
    quiet_data_context()
    start = latest_checkpoint_step(storage, run_name) * batch_size
    return train_dataset(spec, start, max(total, start + 1), tasks)


def latest_checkpoint_step(storage: str, run_name: str) -> int:
    """Step of the checkpoint Ray Train will restore for this run (0 if none).

    Read from Ray's own checkpoint record, the file `get_checkpoint()` restores from after a restart:
    a checkpoint folder can be uploaded before Ray registers it, so the newest folder on disk may not be
    the one the workers get. (A private file of Ray 2.60; the resume test fails if it changes.)
    """
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    path = f"{root}/{run_name}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return 0
    with fs.open_input_stream(path) as f:
        latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name") or ""
    if not name.startswith("step_"):
        raise RuntimeError(f"{path}: cannot tell which checkpoint Ray Train will restore")
    return int(name.removeprefix("step_"))


def quiet_data_context() -> None:
    """Ray Data settings of this process: a rerun must see the examples in the same order. Ray Data's progress
    is logged at INFO, hidden like its other INFO lines, rather than drawn as bars: with no terminal attached
    (workers, actors) and no Ray tqdm it logs; bars turned off are announced by a warning of their own."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.use_ray_tqdm = False
    ctx.execution_options.preserve_order = True
    quiet_ray_loggers()


def quiet_ray_loggers() -> None:
    """Ray Train and Ray Data's INFO lines in this process (a checkpoint created, a result reported, a dataset's
    execution started and finished) hidden; their warnings stay."""
    import logging

    import ray.train.v2._internal.execution.context as train_context

    for name in ("ray.train", "ray.data", train_context.__file__):  # that module names its logger by its path
        logging.getLogger(name).setLevel(logging.WARNING)
