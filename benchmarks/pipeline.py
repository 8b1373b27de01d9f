"""Throughput of the training pipeline, by hand (not in CI):

  (a) a plain single-process PyTorch loop fed by the same generator (generation inline), and the same
      loop on batches generated beforehand (pure compute, an upper bound);
  (b) TorchTrainer fed by Ray Data: the real `reasonlab train` path, tokens/s as logged to MLflow;
  (c) the generator alone (generate + tokenize + pad) on one core, in examples/s.

Targets (issue 2): (b)/(a) >= 0.9, and (c) >= 10x the examples/s that training consumes.

    python benchmarks/pipeline.py [JOB] [--steps N] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # (c) is measured on one core

import torch  # noqa: E402

from reasonlab.config import load_config  # noqa: E402
from reasonlab.data import encode_range  # noqa: E402
from reasonlab.loop import TrainLoop  # noqa: E402
from reasonlab.methods import make_method  # noqa: E402
from reasonlab.models import build_causal_lm  # noqa: E402
from reasonlab.tokenizer import tokenizer_from_files  # noqa: E402
from reasonlab.train import prepare_run  # noqa: E402

WARMUP_STEPS = 20  # excluded from every rate: allocator and thread-pool warmup


def generator_rate(spec: dict, n: int) -> float:
    encode_range(spec, 0, 256)  # build the task and tokenizer first
    start = time.perf_counter()
    for lo in range(0, n, 1024):
        encode_range(spec, lo, min(n, lo + 1024))
    return n / (time.perf_counter() - start)


def plain_loop(cfg, spec: dict, steps: int, threads: int, pregenerated: bool) -> float:
    """Tokens/s of the same model on the same batches, one process, no Ray."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    tokenizer = tokenizer_from_files(spec["tokenizer"])
    method = make_method(cfg.method, cfg)
    model = build_causal_lm(cfg.model, len(tokenizer), spec["max_len"], tokenizer.eos_token_id, torch.device("cpu"))
    loop = TrainLoop(model, method, cfg.train, torch.device("cpu"))
    bs = cfg.train.batch_size

    def batch(step):
        return {k: torch.from_numpy(v) for k, v in encode_range(spec, step * bs, (step + 1) * bs).items()}

    ready = [batch(s) for s in range(steps)] if pregenerated else None
    tokens, start = 0, None
    for step in range(steps):
        if step == WARMUP_STEPS:
            tokens, start = 0, time.perf_counter()
        b = ready[step] if pregenerated else batch(step)
        loop.train_step([b])
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def ray_trainer(cfg, steps: int) -> tuple[float, float]:
    """Tokens/s of `reasonlab train` (TorchTrainer + Ray Data), from the run's MLflow metrics."""
    from mlflow.tracking import MlflowClient

    from reasonlab.train import run_training

    with tempfile.TemporaryDirectory() as home:
        os.environ["REASONLAB_HOME"] = home
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        cfg = cfg.replace(train={"max_steps": steps, "eval_every": steps, "log_every": WARMUP_STEPS},
                          eval={"num_examples": 50, "test_examples": 50, "log_predictions": 0})
        start = time.perf_counter()
        outcome = run_training(cfg)
        wall = time.perf_counter() - start
        history = MlflowClient(outcome.tracking_uri).get_metric_history(outcome.run_id, "train/tokens_per_sec")
        rates = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > WARMUP_STEPS]
        return sum(rates) / len(rates), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", nargs="?", default="jobs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--generated", type=int, default=50_000, help="examples for the generator measurement")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.job, args.overrides)
    spec = prepare_run(cfg)
    threads = cfg.scaling.torch_threads or max(1, (os.cpu_count() or 1) // cfg.scaling.num_workers)
    tokens_per_example = spec["seq_len"]  # fixed-width tasks: every example has this many tokens

    gen = generator_rate(spec, args.generated)
    print(f"(c) generator, one core: {gen:,.0f} examples/s", flush=True)
    inline = plain_loop(cfg, spec, args.steps, threads, pregenerated=False)
    print(f"(a) plain loop, generation inline: {inline:,.0f} tokens/s", flush=True)
    compute = plain_loop(cfg, spec, args.steps, threads, pregenerated=True)
    print(f"(a') plain loop, batches generated beforehand: {compute:,.0f} tokens/s", flush=True)
    ray_rate, wall = ray_trainer(cfg, args.steps)
    print(f"(b) TorchTrainer + Ray Data: {ray_rate:,.0f} tokens/s ({wall:.0f} s wall for {args.steps} steps)")
    consumed = ray_rate / tokens_per_example
    result = {
        "job": args.job, "overrides": args.overrides, "steps": args.steps, "threads": threads,
        "num_workers": cfg.scaling.num_workers, "seq_len": spec["seq_len"], "batch_size": cfg.train.batch_size,
        "generator_examples_per_sec": round(gen), "plain_inline_tokens_per_sec": round(inline),
        "plain_pregenerated_tokens_per_sec": round(compute), "ray_tokens_per_sec": round(ray_rate),
        "ray_over_plain_inline": round(ray_rate / inline, 3), "ray_over_plain_pregenerated": round(ray_rate / compute, 3),
        "training_examples_per_sec": round(consumed, 1), "generator_over_training": round(gen / consumed, 1),
    }
    print(json.dumps(result, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
