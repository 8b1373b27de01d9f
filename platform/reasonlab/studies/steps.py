"""Accuracy and throughput against the diffusion sampling steps T of an eval-only sweep (steps.csv and
steps_vs_accuracy.png on its parent run), with the finished baselines beside the trials."""
from __future__ import annotations

import tempfile
from pathlib import Path

STEPS_CSV = "steps.csv"
STEPS_PNG = "steps_vs_accuracy.png"


def _effective_steps(params: dict) -> int | None:
    from reasonlab.analysis.steps import STEP_KEYS

    for key in STEP_KEYS:
        if params.get(key) not in (None, "None", ""):
            return int(params[key])
    return None


def steps_rows(client, parent_run_id: str, grid: list, baselines: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """(one row per finished trial of an eval-only sweep, one per baseline run), for steps.csv."""
    from reasonlab.analysis.steps import STEP_KEYS
    from reasonlab.tracking import child_runs

    children = child_runs(client, client.get_run(parent_run_id).info.experiment_id, parent_run_id)
    others = [k for k in grid if k not in STEP_KEYS]
    rows = []
    for run in children:
        p, m = run.data.params, run.data.metrics
        if "eval/accuracy" not in m:
            continue
        series = ", ".join(f"{k.split('.')[-1]}={p.get(k)}" for k in others) or p.get("method.name", "")
        rows.append({"kind": "trial", "run_name": run.info.run_name, "method": p.get("method.name"),
                     "steps": _effective_steps(p), "sampler": p.get("method.sampler"),
                     "samples": p.get("eval.samples"), "series": series, "num_examples": p.get("eval.num_examples"),
                     "accuracy": m["eval/accuracy"], "examples_per_sec": m["eval/examples_per_sec"],
                     "run_id": run.info.run_id})
    rows.sort(key=lambda r: (r["series"], r["steps"] or 0))
    base = []
    for run_id, label in baselines.items():
        run = client.get_run(run_id)
        p, m = run.data.params, run.data.metrics
        base.append({"kind": "baseline", "run_name": run.info.run_name, "method": p.get("method.name"), "steps": "",
                     "sampler": "", "samples": p.get("eval.samples"), "series": "",
                     "num_examples": p.get("eval.num_examples"), "accuracy": m["eval/accuracy"],
                     "examples_per_sec": m.get("eval/examples_per_sec", float("nan")), "run_id": run_id,
                     "label": f"{p.get('method.name')} ({label})"})
    return rows, base


def steps_analysis(client, parent_run_id: str, grid: list, baselines: dict[str, str]) -> str:
    """steps.csv and steps_vs_accuracy.png on an eval-only sweep's parent run, when the grid varies T;
    returns what to print."""
    from reasonlab.analysis.steps import STEP_KEYS, plot_steps
    from reasonlab.train import _csv

    if not any(k in grid for k in STEP_KEYS):
        return ""
    rows, base = steps_rows(client, parent_run_id, grid, baselines)
    if not rows:
        return "no trial finished; no steps.csv\n"
    columns = ["kind", "run_name", "method", "steps", "sampler", "samples", "series", "num_examples", "accuracy",
               "examples_per_sec", "run_id"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / STEPS_CSV).write_text(_csv([{c: r[c] for c in columns} for r in rows + base]))
        plot_steps(rows, str(Path(d) / STEPS_PNG), base)
        client.log_artifact(parent_run_id, str(Path(d) / STEPS_CSV))
        client.log_artifact(parent_run_id, str(Path(d) / STEPS_PNG))
    lines = [f"{'T':>5} {'series':<36} {'accuracy':>9} {'examples/s':>11}"]
    lines += [f"{r['steps']:>5} {r['series']:<36} {100 * r['accuracy']:>8.1f}% {r['examples_per_sec']:>11.1f}"
              for r in rows]
    lines += [f"{'':>5} {b['label']:<36} {100 * b['accuracy']:>8.1f}% {b['examples_per_sec']:>11.1f}" for b in base]
    return "\n".join(lines) + f"\n({STEPS_CSV} and {STEPS_PNG} logged to the parent run)\n"


class StepsAnalysis:
    """The steps table and plot, when an eval-only sweep varies T."""

    name = "steps"

    def applies(self, study) -> bool:
        from reasonlab.analysis.steps import STEP_KEYS

        return study.eval_only and any(k in study.grid for k in STEP_KEYS)

    def run(self, study) -> str:
        return steps_analysis(study.client, study.parent_run_id, study.grid, study.baselines)
