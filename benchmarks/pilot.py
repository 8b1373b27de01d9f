"""Training pilots for any job, by hand (not in CI): the core's TrainLoop in a plain loop, no Ray and
no MLflow, so it also runs where only PyTorch is installed (the GPU machine).

Each pilot trains one job (with KEY=VALUE overrides) and evaluates its validation examples every
`--eval-every` steps; one JSON line per evaluation goes to stdout and to `--log`. `--parallel` runs
several pilots at once as separate processes (one per `--pilot "name: key=value ..."`), which is how a
single GPU can try several settings in the time of one. `--eval-steps` (diffusion sampling steps T)
applies to diffusion jobs; other methods are evaluated once per evaluation.

    python benchmarks/pilot.py jobs/dot_mult.yaml --minutes 10 --eval-every 1000 \\
        --pilot "base:" --pilot "big batch: train.batch_size=256" --parallel
    python benchmarks/pilot.py jobs/si_mult.yaml --eval-steps none --parallel \\
        --pilot "base:" --pilot "faster: method.remove_per_epoch=16"
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from reasonlab.config import load_config
from reasonlab.evaluate import evaluate
from reasonlab.loop import TrainLoop

from common import build_run, stream_batch  # benchmarks/common.py


def pilot(job: str, overrides: list[str], name: str, minutes: float, eval_every: int, eval_examples: int,
          eval_steps: list[int], log) -> None:
    cfg = load_config(job, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec, tokenizer, task, method, model = build_run(cfg, device)
    loop = TrainLoop(model, method, cfg.train, device)
    examples = task.eval_sets("valid")["eval"][:eval_examples]
    bs, start, evaluating = cfg.train.batch_size, time.perf_counter(), 0.0
    for step in range(1, cfg.train.max_steps + 1):
        loss, _ = loop.train_step([stream_batch(spec, step - 1, bs, device)])
        last = step == cfg.train.max_steps or time.perf_counter() - start - evaluating > minutes * 60
        if step % eval_every == 0 or last:
            row = {"pilot": name, "step": step, "loss": round(loss.item(), 3),
                   "train_s": round(time.perf_counter() - start - evaluating, 1), **method.step_metrics(step)}
            began = time.perf_counter()
            for t in eval_steps:
                result = evaluate(model, tokenizer, method, examples, batch_size=cfg.eval.batch_size,
                                  max_new_tokens=spec["max_new_tokens"], device=device,
                                  precision=cfg.train.precision, seq_len=spec["seq_len"], steps=t)
                row["accuracy" if t is None else f"acc_T{t}"] = result.accuracy
            model.train()
            evaluating += time.perf_counter() - began  # evaluation time is not training time
            print(json.dumps(row), file=log, flush=True)
            print(json.dumps(row), flush=True)
        if last:
            break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job")
    p.add_argument("--pilot", action="append", default=[], help="'name: key=value ...' (repeatable)")
    p.add_argument("--minutes", type=float, default=10.0, help="training time per pilot")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--eval-steps", default="64", help="diffusion sampling steps T to evaluate, comma-separated; "
                   "'none' for other methods")
    p.add_argument("--parallel", action="store_true", help="one process per pilot, all at once")
    p.add_argument("--log", default="pilot.jsonl")
    args = p.parse_args()
    pilots = [(spec.split(":", 1)[0].strip(), spec.split(":", 1)[1].split()) for spec in args.pilot] or [("base", [])]
    if args.parallel and len(pilots) > 1:
        procs = []
        for name, overrides in pilots:
            cmd = [sys.executable, __file__, args.job, "--pilot", f"{name}: {' '.join(overrides)}",
                   "--minutes", str(args.minutes), "--eval-every", str(args.eval_every),
                   "--eval-examples", str(args.eval_examples), "--eval-steps", args.eval_steps,
                   "--log", f"{args.log}.{len(procs)}"]
            procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        sys.exit(max(proc.wait() for proc in procs))
    with open(args.log, "a") as log:
        for name, overrides in pilots:
            pilot(args.job, overrides, name, args.minutes, args.eval_every, args.eval_examples,
                  [None] if args.eval_steps == "none" else [int(t) for t in args.eval_steps.split(",")], log)


if __name__ == "__main__":
    main()
