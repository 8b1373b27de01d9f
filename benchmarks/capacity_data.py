"""Question generation against consumption for the capacity study, by hand (not in CI).

Issue 3's target: generating questions (profiles → text → tokens → packed rows) on one core must
outpace what the largest model of the default sweep consumes on one GPU-free worker by >= 10x
(EleutherAI's repo needed 15 DataLoader workers per GPU).

    python benchmarks/capacity_data.py [SWEEP] [--steps N] [--rows N]

It picks the sweep's trial with the most parameters (and people), runs it on the CPU, and prints
questions/s generated on one core, questions/s trained on, and their ratio as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # generation is measured on one core

import torch  # noqa: E402

from pipeline import generator_rate  # noqa: E402  (benchmarks/ is the script's folder)
from reasonlab.data import encode_range  # noqa: E402
from reasonlab.loop import TrainLoop  # noqa: E402
from reasonlab.methods import make_method  # noqa: E402
from reasonlab.models import build_causal_lm  # noqa: E402
from reasonlab.sweep import load_sweep  # noqa: E402
from reasonlab.tokenizer import tokenizer_from_files  # noqa: E402
from reasonlab.train import prepare_run  # noqa: E402

WARMUP_STEPS = 2


def training_rows_per_sec(cfg, spec: dict, rows: int, steps: int) -> float:
    """Rows/s of forward + backward + AdamW on batches generated beforehand, all cores of this machine."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    tokenizer = tokenizer_from_files(spec["tokenizer"])
    method = make_method(cfg.method, cfg)
    model = build_causal_lm(cfg.model, len(tokenizer), spec["max_len"], tokenizer.eos_token_id, torch.device("cpu"))
    loop = TrainLoop(model, method, cfg.train, torch.device("cpu"))
    batches = [{k: torch.from_numpy(v) for k, v in encode_range(spec, s * rows, (s + 1) * rows).items()}
               for s in range(steps)]
    start = None
    for step, batch in enumerate(batches):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        loop.train_step([batch])
    return rows * (steps - WARMUP_STEPS) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", default="search_spaces/capacity_vs_size.yaml")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=32, help="rows per timed training step")
    p.add_argument("--generated", type=int, default=20_000, help="rows for the generation measurement")
    args = p.parse_args()
    sweep = load_sweep(args.sweep, ["scaling.use_gpu=false"])
    configs = [sweep.trial_config(i) for i in range(len(sweep.trials))]
    cfg = max(configs, key=lambda c: (c.model.n_params or 0, getattr(c.task, "num_profiles", 0)))
    start = time.perf_counter()
    spec = prepare_run(cfg)
    prepared = time.perf_counter() - start
    from reasonlab.config import config_from_dict

    cfg = config_from_dict(spec["config"], job=cfg.job)  # with the derived width
    pack = make_method(cfg.method, cfg).examples_per_row
    generated = generator_rate(spec, args.generated) * pack
    consumed = training_rows_per_sec(cfg, spec, args.rows, args.steps) * pack
    result = {"sweep": args.sweep, "task": cfg.to_dict()["task"], "model": cfg.to_dict()["model"],
              "pack": pack, "seq_len": spec["seq_len"], "prepare_seconds": round(prepared, 1),
              "cpu_threads_training": os.cpu_count(),
              "generated_questions_per_sec_one_core": round(generated),
              "trained_questions_per_sec": round(consumed, 1),
              "generation_over_training": round(generated / consumed, 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
