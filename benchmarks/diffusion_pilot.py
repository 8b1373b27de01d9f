"""Training pilots for diffusion jobs, by hand (not in CI): the core's training step in a plain loop,
no Ray and no MLflow, so it also runs where only PyTorch is installed (the GPU machine).

Each pilot trains one job (with KEY=VALUE overrides) and evaluates its validation examples every
`--eval-every` steps; one JSON line per evaluation goes to stdout and to `--log`. `--parallel` runs
several pilots at once as separate processes (one per `--pilot "name: key=value ..."`), which is how a
single GPU can try several settings in the time of one.

    python benchmarks/diffusion_pilot.py jobs/dot_mult.yaml --minutes 10 --eval-every 1000 \\
        --pilot "base:" --pilot "big batch: train.batch_size=256" --parallel
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
from reasonlab.data import encode_range
from reasonlab.evaluate import evaluate
from reasonlab.methods import make_method
from reasonlab.tasks import make_task
from reasonlab.tokenizer import tokenizer_from_files
from reasonlab.train import lr_factor, make_optimizer, prepare_run

from common import plain_step  # benchmarks/common.py


def pilot(job: str, overrides: list[str], name: str, minutes: float, eval_every: int, eval_examples: int,
          eval_steps: list[int], log) -> None:
    cfg = load_config(job, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    spec = prepare_run(cfg)
    tokenizer = tokenizer_from_files(spec["tokenizer"])
    method, task = make_method(cfg.method), make_task(cfg.task)
    model = method.build_model(cfg.model, tokenizer, spec["max_len"], device)
    optimizer = make_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
    examples = task.eval_sets("valid")["eval"][:eval_examples]
    bs, start, evaluating = cfg.train.batch_size, time.perf_counter(), 0.0
    for step in range(1, cfg.train.max_steps + 1):
        batch = {k: torch.from_numpy(v).to(device, non_blocking=True)
                 for k, v in encode_range(spec, (step - 1) * bs, step * bs).items()}
        loss = plain_step(method, model, batch, optimizer, scheduler, cfg.train.grad_clip, device,
                          cfg.train.precision)
        last = step == cfg.train.max_steps or time.perf_counter() - start - evaluating > minutes * 60
        if step % eval_every == 0 or last:
            row = {"pilot": name, "step": step, "loss": round(loss.item(), 3),
                   "train_s": round(time.perf_counter() - start - evaluating, 1)}
            began = time.perf_counter()
            for t in eval_steps:
                result = evaluate(model, tokenizer, method, examples, batch_size=cfg.eval.batch_size,
                                  max_new_tokens=spec["max_new_tokens"], device=device,
                                  precision=cfg.train.precision, seq_len=spec["seq_len"], steps=t)
                row[f"acc_T{t}"] = result.accuracy
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
    p.add_argument("--eval-steps", default="64", help="sampling steps T to evaluate, comma-separated")
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
                  [int(t) for t in args.eval_steps.split(",")], log)


if __name__ == "__main__":
    main()
