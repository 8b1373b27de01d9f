"""The core on one GPU, by hand (not in CI): training-step throughput and MFU, sampler throughput, and
which SDPA kernels run. No Ray and no MLflow, so it runs where only PyTorch is installed.

    python benchmarks/gpu.py [--steps 30] [--json out.json]

Training: forward, backward, clipping and AdamW of `method.loss` on rows of the job's training stream
(generated beforehand), fp32 and bf16 autocast. FLOPs per step are counted by PyTorch's FlopCounterMode
on one step (matrix products and attention, forward and backward), so MFU = counted FLOPs per second
over the GPU's dense bf16 peak. Sampling: `evaluate` on the task's validation prompts, as a run scores
them (tokenizing to answer extraction), at batch 1 and at a large batch; the models are untrained, so
autoregressive decoding runs to its full budget (the target length + 8 tokens), the worst case.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from reasonlab.config import load_config
from reasonlab.evaluate import autocast_context, evaluate
from reasonlab.loop import TrainLoop
from reasonlab.models import count_parameters

from common import build_run, stream_batch  # benchmarks/common.py

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s (SXM)

# (label, job, overrides, training batch)
CASES = [
    ("AR CoT, GPT-2 4L d128, 3x3", "jobs/quickstart.yaml", [], 64),
    ("AR CoT, GPT-2 4L d128, 3x3", "jobs/quickstart.yaml", [], 1024),
    ("AR CoT, GPT-2 12L d768, 4x4", "jobs/quickstart.yaml",
     ["task.a_digits=4", "task.b_digits=4", "model.n_layer=12", "model.d_model=768", "model.n_head=12"], 256),
    ("DoT, DDiT 4L d128, 3x3", "jobs/dot_mult.yaml", [], 64),
    ("DoT, DDiT 4L d128, 3x3", "jobs/dot_mult.yaml", [], 1024),
    ("DoT, DDiT 12L d768, 4x4", "jobs/dot_mult.yaml",
     ["task.a_digits=4", "task.b_digits=4", "model.n_layer=12", "model.d_model=768", "model.n_head=12"], 256),
]


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def setup(job: str, overrides: list[str], device: torch.device):
    cfg = load_config(job, overrides)
    spec, tokenizer, task, method, model = build_run(cfg, device)
    return cfg, spec, tokenizer, method, task, model


def train_rate(cfg, spec, method, model, batch_size: int, steps: int, precision: str, device) -> dict:
    loop = TrainLoop(model, method, dataclasses.replace(cfg.train, precision=precision), device)
    batches = [stream_batch(spec, i, batch_size, device) for i in range(4)]

    def step(batch):
        loop.train_step([batch])

    with FlopCounterMode(display=False) as counter:
        step(batches[0])
    flops = counter.get_total_flops()
    for i in range(5):  # warm-up: kernels, allocator
        step(batches[i % 4])
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % 4])
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = batch_size * spec["seq_len"]
    return {"step_ms": round(seconds * 1e3, 2), "tokens_per_sec": round(tokens / seconds),
            "examples_per_sec": round(batch_size / seconds), "tflops": round(flops / seconds / 1e12, 2),
            "flops_per_step": flops}


def attention_kernels(method, model, spec, device) -> list[str]:
    """Names of the CUDA kernels that ran attention in one bf16 training forward."""
    batch = stream_batch(spec, 0, 64, device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with autocast_context(device, "bf16"):
            method.loss(model, batch)
        torch.cuda.synchronize(device)
    names = {e.key for e in prof.key_averages()}
    return sorted(n[:80] for n in names if any(w in n.lower() for w in ("flash", "fmha", "attention", "mem_eff")))


def sampler_rates(cfg, spec, tokenizer, method, task, model, device) -> list[dict]:
    examples = task.eval_sets("valid")["eval"]
    rows = []
    settings = [{"steps": t, "sampler": s} for s in ("confidence", "analytic") for t in (1, 4, 16, 64)] \
        if method.decoding == "parallel" else [{}]
    for setting in settings:
        for batch_size, n in ((1, 20), (256, 512)):
            if "sampler" in setting:
                method.sampler = setting["sampler"]
            evaluate(model, tokenizer, method, examples[:batch_size], batch_size=batch_size,  # warm-up
                     max_new_tokens=spec["max_new_tokens"], device=device, seq_len=spec["seq_len"],
                     steps=setting.get("steps"))
            result = evaluate(model, tokenizer, method, examples[:n], batch_size=batch_size,
                              max_new_tokens=spec["max_new_tokens"], device=device, seq_len=spec["seq_len"],
                              steps=setting.get("steps"))
            rows.append({**setting, "batch_size": batch_size, "examples_per_sec": round(result.examples_per_sec, 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    peak = peak_flops(device)
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "peak_bf16_flops": peak, "cases": []}
    print(f"{results['device']}, torch {torch.__version__}, dense bf16 peak {peak and peak / 1e12} TFLOP/s")
    sampled = set()
    for label, job, overrides, batch_size in CASES:
        cfg, spec, tokenizer, method, task, model = setup(job, overrides, device)
        case = {"case": label, "batch_size": batch_size, "seq_len": spec["seq_len"],
                "params": count_parameters(model)}
        for precision in ("fp32", "bf16"):
            case[precision] = train_rate(cfg, spec, method, model, batch_size, args.steps, precision, device)
        if peak:
            case["bf16"]["mfu"] = round(case["bf16"]["tflops"] * 1e12 / peak, 4)
        case["attention_kernels"] = attention_kernels(method, model, spec, device)
        if label not in sampled:
            sampled.add(label)
            case["sampling"] = sampler_rates(cfg, spec, tokenizer, method, task, model, device)
        results["cases"].append(case)
        print(json.dumps(case), flush=True)
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
