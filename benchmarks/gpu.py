"""The core on one device, by hand (not in CI): training-step throughput, MFU and the share of step time
outside kernels, eager and compiled; decoding ms per token with the dynamic and the static KV cache; the
sampler table; which SDPA kernels run. No Ray and no MLflow, so it runs where only PyTorch is installed.

    python benchmarks/gpu.py [--steps 30] [--json out.json] [--cases NAME ...]   # on a GPU
    python benchmarks/gpu.py --tiny                                             # any machine: every path, toy sizes

Training: forward, backward, clipping and AdamW of `method.loss` on rows of the job's training stream
(generated beforehand), fp32 and bf16 autocast eagerly, and bf16 with `train.compile`. FLOPs per step are
counted by PyTorch's FlopCounterMode on one eager step (matrix products and attention, forward and backward),
so MFU = counted FLOPs per second over the GPU's dense bf16 peak. Outside kernels: 1 − (GPU kernel time ÷ wall
time) over profiled steps (torch.profiler): the step's Python, launch and synchronisation overhead.
Decoding: greedy, batch 1, each decoder writing its full budget (`decode` with no stop). Sampling: `evaluate`
on the task's validation prompts, as a run scores them (tokenizing to answer extraction), at batch 1 and a
large batch; the models are untrained, so autoregressive decoding runs to its full budget (the target length
+ 8 tokens), the worst case.
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
from reasonlab.methods.autoregressive import DECODERS, decode
from reasonlab.models import build_causal_lm, count_parameters

from common import build_run, stream_batch  # benchmarks/common.py

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s (SXM)
GPT2_VOCAB = 50_304  # GPT-2's 50,257 tokens padded to a multiple of 64, as nanoGPT and llm.c train it
FOUR_BY_FOUR = ["task.a_digits=4", "task.b_digits=4", "model.n_layer=12", "model.d_model=768", "model.n_head=12"]
TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=2"]


@dataclasses.dataclass
class Case:
    label: str
    job: str
    overrides: list[str]
    rows: int  # training rows per step
    vocab: int | None = None  # output classes when not the task tokenizer's (GPT-2 124M's embedding and head)
    row_tokens: int | None = None  # padded row length when not the task's
    sample: bool = False  # also the decoding and sampler tables


# 4×4 CoT rows are 67 tokens: 15 fill a 1,024-token row (1,005 tokens); 16 per row keep the recipe's 256
# examples per step in 16 rows of 1,072 tokens
CASES = {
    "gpt2_124m": Case("GPT-2 124M (12L d768, vocab 50,304), 4x4 CoT packed 15 per 1,024-token row",
                      "jobs/quickstart.yaml", [*FOUR_BY_FOUR, "method.pack=15"], 32, GPT2_VOCAB, 1024),
    "recipe_4x4": Case("AR CoT, GPT-2 12L d768 (85M), 4x4 recipe", "jobs/quickstart.yaml", FOUR_BY_FOUR, 256,
                       sample=True),
    "recipe_4x4_packed": Case("same, packed 16 per row", "jobs/quickstart.yaml", [*FOUR_BY_FOUR, "method.pack=16"],
                              16),
    "quickstart": Case("AR CoT, GPT-2 4L d128 (0.8M), 3x3 quickstart", "jobs/quickstart.yaml", [], 64, sample=True),
    "dot_4x4": Case("DoT, DDiT 12L d768, 4x4", "jobs/dot_mult.yaml", FOUR_BY_FOUR, 256, sample=True),
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(case: Case, tiny: bool, device: torch.device):
    cfg = load_config(case.job, [*case.overrides, *(TINY if tiny else [])])
    spec, tokenizer, task, method, model = build_run(cfg, device)
    if case.row_tokens:
        if spec["seq_len"] > case.row_tokens:
            raise ValueError(f"{case.label}: packed rows need {spec['seq_len']} tokens, more than {case.row_tokens}")
        spec["seq_len"] = case.row_tokens
    if case.vocab and not tiny:
        torch.manual_seed(cfg.train.seed)
        model = build_causal_lm(cfg.model, case.vocab, max(spec["max_len"], 1024), tokenizer.eos_token_id, device)
    return cfg, spec, tokenizer, method, task, model


def train_rate(cfg, spec, method, model, rows: int, steps: int, precision: str, compile: bool, device,
               flops: float | None = None) -> dict:
    """Step time, tokens/s and FLOP/s of `steps` training steps after warm-up, and the share of step time
    outside GPU kernels. `flops`: FLOPs of one step, counted here (eagerly) when not given."""
    loop = TrainLoop(model, method, dataclasses.replace(cfg.train, precision=precision, compile=compile), device)
    batches = [stream_batch(spec, i, rows, device) for i in range(4)]

    def step(i):
        loop.train_step([batches[i % 4]])

    if flops is None:
        with FlopCounterMode(display=False) as counter:
            step(0)
        flops = counter.get_total_flops()
    for i in range(3 if compile else 5):  # warm-up: compilation, kernels, allocator
        step(i)
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)  # real tokens of a step
    return {"step_ms": round(seconds * 1e3, 2), "tokens_per_sec": round(tokens / seconds),
            "rows_per_sec": round(rows / seconds), "tflops": round(flops / seconds / 1e12, 3),
            "flops_per_step": flops, "outside_kernels": outside_kernel_share(step, device)}


def outside_kernel_share(step, device: torch.device, steps: int = 5) -> float | None:
    """1 − GPU kernel time ÷ wall time over `steps` profiled steps (None without CUDA: nothing to measure)."""
    if device.type != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return round(1 - kernel_us / wall_us, 3)


def attention_kernels(method, model, spec, device) -> list[str]:
    """Names of the CUDA kernels that ran attention in one bf16 training forward."""
    if device.type != "cuda":
        return []
    batch = stream_batch(spec, 0, 4, device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with autocast_context(device, "bf16"):
            method.loss(model, batch)
        synchronize(device)
    names = {e.key for e in prof.key_averages()}
    return sorted(n[:80] for n in names if any(w in n.lower() for w in ("flash", "fmha", "attention", "mem_eff")))


@torch.inference_mode()
def decode_ms_per_token(tokenizer, method, task, model, device, tokens: int, prompts: int) -> dict[str, float]:
    """Greedy batch-1 decoding, each decoder writing `tokens` tokens for each of `prompts` prompts (bf16
    autocast on CUDA, as evaluation runs): ms per token, after one warm-up prompt."""
    model.eval()
    eos = tokenizer.eos_token
    texts = [method.prompt_text(e, eos) for e in task.eval_sets("valid")["eval"][:prompts + 1]]
    out = {}
    for decoder in DECODERS:
        for i, text in enumerate(texts):
            if i == 1:
                synchronize(device)
                start = time.perf_counter()
            enc = tokenizer(text, add_special_tokens=False, return_tensors="pt", return_token_type_ids=False).to(device)
            with autocast_context(device, "auto"):
                decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=tokens,
                       eos_id=tokenizer.eos_token_id, stop_after=tokens + 1, decoder=decoder)
        synchronize(device)
        out[decoder] = round((time.perf_counter() - start) * 1e3 / (prompts * tokens), 3)
    return out


def sampler_rates(spec, tokenizer, method, task, model, device, sizes) -> list[dict]:
    """examples/s of `evaluate` per decoding setting, at each (batch size, examples) of `sizes`."""
    examples = task.eval_sets("valid")["eval"]
    if method.decoding == "parallel":
        settings = [{"steps": t, "sampler": s} for s in ("confidence", "analytic") for t in (1, 4, 16, 64)]
    else:
        settings = [{"decoder": d} for d in DECODERS]
    rows = []
    for setting in settings:
        for batch_size, n in sizes:
            if "sampler" in setting:
                method.sampler = setting["sampler"]
            kwargs = {"batch_size": batch_size, "max_new_tokens": spec["max_new_tokens"], "device": device,
                      "seq_len": spec["seq_len"], "steps": setting.get("steps"),
                      "decoder": setting.get("decoder", "dynamic")}
            evaluate(model, tokenizer, method, examples[:batch_size], **kwargs)  # warm-up (and CUDA graph capture)
            result = evaluate(model, tokenizer, method, examples[:n], **kwargs)
            rows.append({**setting, "batch_size": batch_size, "examples_per_sec": round(result.examples_per_sec, 1)})
    return rows


def run_case(name: str, case: Case, args, device: torch.device, peak: float | None) -> dict:
    cfg, spec, tokenizer, method, task, model = setup(case, args.tiny, device)
    rows = min(case.rows, 4) if args.tiny else case.rows
    result = {"case": name, "label": case.label, "rows": rows, "row_tokens": spec["seq_len"],
              "examples_per_row": method.examples_per_row, "params": count_parameters(model)}
    precisions = ["bf16"] if device.type == "cuda" else ["fp32"]
    if device.type == "cuda" and not args.no_fp32:
        precisions.insert(0, "fp32")
    flops = None
    for precision in precisions:
        result[precision] = train_rate(cfg, spec, method, model, rows, args.steps, precision, False, device)
        flops = result[precision]["flops_per_step"]
    result["attention_kernels"] = attention_kernels(method, model, spec, device)
    if case.sample:
        if method.decoding == "autoregressive":
            result["decode_ms_per_token_batch1"] = decode_ms_per_token(
                tokenizer, method, task, model, device, tokens=spec["max_new_tokens"], prompts=2 if args.tiny else 10)
        if not args.no_sampler_table:
            sizes = ((1, 3), (8, 16)) if args.tiny else ((1, 20), (256, 512))
            result["sampling"] = sampler_rates(spec, tokenizer, method, task, model, device, sizes)
    if not args.no_compile:  # last: compiling works in place, on this model
        result[f"{precisions[-1]}_compiled"] = train_rate(cfg, spec, method, model, rows, args.steps, precisions[-1],
                                                          True, device, flops)
    if peak:
        for key in ("bf16", "bf16_compiled"):
            if key in result:
                result[key]["mfu"] = round(result[key]["tflops"] * 1e12 / peak, 4)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", default=None)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--tiny", action="store_true", help="toy sizes (2 layers, d=64, few rows and examples): checks "
                                                       "every path end to end on any machine, in minutes on a CPU")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32 step on CUDA")
    p.add_argument("--no-sampler-table", action="store_true",
                   help="skip the evaluate() table (decoding ms/token stays)")
    p.add_argument("--device", default=None, help="default: cuda where there is one, else cpu")
    args = p.parse_args()
    if args.tiny:
        args.steps = min(args.steps, 3)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    results = {"device": name, "torch": torch.__version__, "peak_bf16_flops": peak, "tiny": args.tiny, "cases": []}
    print(f"{name}, torch {torch.__version__}, dense bf16 peak {peak and peak / 1e12} TFLOP/s", flush=True)
    for case_name in args.cases:
        case = run_case(case_name, CASES[case_name], args, device, peak)
        results["cases"].append(case)
        print(json.dumps(case), flush=True)
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
