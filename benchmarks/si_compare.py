"""Stepwise internalization against explicit CoT and no CoT, back to back on one machine (by hand, not in
CI): trains the three runs of a job with `reasonlab train` one after another, then measures each finished
model on the same test examples with the same evaluator, at batch size 1 (the papers' figure) and at a
large batch. Prints a Markdown table and writes JSON.

    python benchmarks/si_compare.py jobs/si_mult.yaml --name si3           # 3×3: ~2 h on 2 cores
    python benchmarks/si_compare.py jobs/si_mult.yaml --name si3 --measure-only      # runs already there
    python benchmarks/si_compare.py jobs/si_mult_2x2.yaml --name si8k      # 2×2: ~45 min
    python benchmarks/si_compare.py jobs/si_mult_2x2.yaml train.seed=1 --name si8k-s1 --train si \\
        --run cot=si8k-cot --run nocot=si8k-nocot           # another SI seed against the same baselines

The three runs are `NAME-si` (the job as written), `NAME-cot` (method.remove_per_epoch=0: the same method
with nothing removed) and `NAME-nocot` (the method section replaced by `{name: nocot}`), all with the
job's model, steps and data.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = {"si": [], "cot": ["method.remove_per_epoch=0"], "nocot": ["method={name: nocot}"]}


def train(job: str, name: str, overrides: list[str]) -> float:
    """Wall seconds of one `reasonlab train` (Ray start-up and final evaluation included)."""
    exe = os.path.join(os.path.dirname(sys.executable), "reasonlab")
    start = time.perf_counter()
    subprocess.run([exe, "train", job, *overrides, f"tracking.run_name={name}"], check=True)
    return time.perf_counter() - start


def measure(run_name: str, batch_sizes: list[int], examples: int) -> dict:
    """Test accuracy and examples/s of a finished run's model, greedy, at each batch size."""
    import transformers
    import yaml
    from mlflow.tracking import MlflowClient

    from reasonlab.config import config_from_dict
    from reasonlab.evaluate import evaluate
    from reasonlab.methods import make_method
    from reasonlab.tasks import make_task
    from reasonlab.tokenizer import load_tokenizer
    from reasonlab.tracking import find_run, tracking_uri
    from reasonlab.train import run_lengths

    transformers.utils.logging.disable_progress_bar()
    client = MlflowClient(tracking_uri())
    run = find_run(client, "reasonlab", run_name, "run")
    out = {"run": run_name, "run_id": run.info.run_id, "status": run.info.status}
    with tempfile.TemporaryDirectory() as d:
        cfg = config_from_dict(yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", d))))
        task, method = make_task(cfg.task), make_method(cfg.method, cfg)
        tokenizer = load_tokenizer(client.download_artifacts(run.info.run_id, "tokenizer", d))
        _, max_new_tokens, max_len = run_lengths(cfg, task, method, tokenizer)
        cfg.model.pretrained = client.download_artifacts(run.info.run_id, "model", d)
        model = method.build_model(cfg.model, tokenizer, max_len, torch.device("cpu"))
    test = task.heldout("test")[:examples]
    for bs in batch_sizes:
        evaluate(model, tokenizer, method, test[:bs], batch_size=bs, max_new_tokens=max_new_tokens,
                 device=torch.device("cpu"))  # warm-up
        r = evaluate(model, tokenizer, method, test, batch_size=bs, max_new_tokens=max_new_tokens,
                     device=torch.device("cpu"))
        out[f"bs{bs}"] = {"accuracy": r.accuracy, "examples_per_sec": r.examples_per_sec}
        out.setdefault("generated", r.predictions[0]["generated"])
    out["test_accuracy_logged"] = run.data.metrics.get("test/accuracy")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every run it trains")
    p.add_argument("--name", required=True, help="run-name prefix")
    p.add_argument("--measure-only", action="store_true")
    p.add_argument("--train", default=",".join(VARIANTS), help="variants to train (comma-separated)")
    p.add_argument("--run", action="append", default=[], metavar="VARIANT=RUN",
                   help="measure this run for a variant instead of NAME-VARIANT (e.g. a baseline trained earlier)")
    p.add_argument("--examples", type=int, default=1000, help="test examples per measurement")
    p.add_argument("--batch-sizes", default="1,100")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    seconds = {}
    runs = {v: f"{args.name}-{v}" for v in VARIANTS} | dict(r.split("=", 1) for r in args.run)
    if not args.measure_only:
        for variant in args.train.split(","):
            seconds[variant] = train(args.job, runs[variant], [*args.overrides, *VARIANTS[variant]])
    torch.set_num_threads(os.cpu_count() or 1)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = {v: {**measure(runs[v], batch_sizes, args.examples), "train_wall_s": seconds.get(v)} for v in VARIANTS}
    head = " | ".join(f"acc bs{b} | ex/s bs{b}" for b in batch_sizes)
    print(f"| method | wall (train cmd) | {head} |")
    print("|---|---|" + "---|---|" * len(batch_sizes))
    for v, r in rows.items():
        cells = " | ".join(f"{100 * r[f'bs{b}']['accuracy']:.1f}% | {r[f'bs{b}']['examples_per_sec']:.1f}"
                           for b in batch_sizes)
        wall = f"{r['train_wall_s'] / 60:.1f} min" if r["train_wall_s"] else "-"
        print(f"| {v} | {wall} | {cells} |")
    for b in batch_sizes:
        si, cot = rows["si"][f"bs{b}"], rows["cot"][f"bs{b}"]
        print(f"batch {b}: SI/CoT throughput {si['examples_per_sec'] / cot['examples_per_sec']:.2f}x at "
              f"{100 * si['accuracy'] / max(cot['accuracy'], 1e-9):.1f}% of CoT's accuracy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
