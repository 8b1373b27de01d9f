"""Study analyses over finished MLflow runs: the capacity table and plot of a sweep (or of one run),
recomputed from the runs' artifacts without retraining, and the accuracy-against-steps table and plot
of an eval-only diffusion sweep."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from reasonlab.config import ConfigError

STEPS_CSV = "steps.csv"
STEPS_PNG = "steps_vs_accuracy.png"
CAPACITY_CSV = "capacity.csv"
CAPACITY_PNG = "capacity_vs_params.png"
LOSSES_FILE = "answer_losses.parquet"


def _capacity_rows(client, run) -> list[dict]:
    """Capacity rows of one training run, from its answer losses and its profiles."""
    import pyarrow.parquet as pq

    from reasonlab.analysis.capacity import capacity_rows
    from reasonlab.tasks.profiles import PROFILES_FILE

    run_id = run.info.run_id
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as d:
        losses = pq.read_table(client.download_artifacts(run_id, LOSSES_FILE, d)).to_pydict()
        schema = pq.read_schema(client.download_artifacts(run_id, f"data/{PROFILES_FILE}", d))
    stats = json.loads(schema.metadata[b"reasonlab.statistics"])
    rows = capacity_rows(losses, stats, int(run.data.params["n_params"]), int(run.data.params["n_params_used"]))
    for row in rows:
        row.update(run_name=run.info.run_name, run_id=run_id, status=run.info.status)
    return rows


def capacity_table(client, run_id: str) -> list[dict]:
    """Rows for a run, or for every child of a sweep's parent run that measured its answer losses."""
    try:
        run = client.get_run(run_id)
    except Exception:
        raise ConfigError(f"{run_id}: no such MLflow run in {client.tracking_uri}") from None
    from reasonlab.tracking import child_runs

    runs = child_runs(client, run.info.experiment_id, run_id) or [run]
    rows = []
    for r in runs:
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        if LOSSES_FILE in names:
            rows += _capacity_rows(client, r)
    if not rows:
        raise ConfigError(f"{run_id}: no run with {LOSSES_FILE} (only finished capacity runs have one)")
    return sorted(rows, key=lambda r: (r["num_profiles"], r["relations"], r["hops"], r["n_params_used"]))


def write_capacity(rows: list[dict], directory: str | Path, scheme: str = "optimal") -> tuple[Path, Path]:
    from reasonlab.analysis.capacity import plot_capacity
    from reasonlab.train import _csv

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = directory / CAPACITY_CSV, directory / CAPACITY_PNG
    csv_path.write_text(_csv(rows))
    plot_capacity(rows, str(png_path), scheme)
    return csv_path, png_path


def format_capacity(rows: list[dict], scheme: str) -> str:
    """A terminal table of the rows under one scheme."""
    header = f"{'N':>7} {'R':>3} {'hops':>4} {'params':>10} {'capacity bits':>14} {'±95%':>8} {'dataset bits':>13} " \
             f"{'bits/param':>10}  run"
    lines = [header]
    for r in rows:
        if f"capacity_{scheme}" not in r:
            continue
        lines.append(f"{r['num_profiles']:>7} {r['relations']:>3} {r['hops']:>4} {r['n_params_used']:>10,} "
                     f"{r[f'capacity_{scheme}']:>14,.0f} {r[f'ci95_{scheme}']:>8,.0f} "
                     f"{r[f'dataset_entropy_{scheme}']:>13,.0f} {r[f'bits_per_param_{scheme}']:>10.3f}  "
                     f"{r['run_name']}")
    return "\n".join(lines) + "\n"


def capacity_report(run_id: str, scheme: str, out: str, log: bool = False) -> str:
    """`reasonlab capacity RUN_ID`: the table printed, capacity.csv and the plot written to `out` (and
    logged to the run with `log`)."""
    from mlflow import MlflowClient

    from reasonlab.analysis.capacity import SCHEMES
    from reasonlab.tracking import tracking_uri

    if scheme not in SCHEMES:
        raise ConfigError(f"--scheme: expected one of {list(SCHEMES)}, got {scheme!r}")
    client = MlflowClient(tracking_uri())
    rows = capacity_table(client, run_id)
    csv_path, png_path = write_capacity(rows, out, scheme)
    if log:
        client.log_artifact(run_id, str(csv_path))
        client.log_artifact(run_id, str(png_path))
    return format_capacity(rows, scheme) + f"\nwrote {csv_path} and {png_path}" + (
        f"; logged to run {run_id}" if log else "") + "\n"


def sweep_analyses(client, parent_run_id: str) -> str:
    """Analyses that apply to a finished sweep, logged to its parent run; returns what to print."""
    try:
        rows = capacity_table(client, parent_run_id)
    except ConfigError:
        return ""  # not a capacity study
    with tempfile.TemporaryDirectory() as d:
        csv_path, png_path = write_capacity(rows, d)
        client.log_artifact(parent_run_id, str(csv_path))
        client.log_artifact(parent_run_id, str(png_path))
    return format_capacity(rows, "optimal") + f"({CAPACITY_CSV} and {CAPACITY_PNG} logged to the parent run)\n"


def log_task_artifacts(client, run_id: str, configs: list) -> None:
    """The data every trial of a sweep uses (e.g. profiles), once per distinct task, on the parent run."""
    from reasonlab.tasks import make_task

    seen = set()
    for cfg in configs:
        key = json.dumps(cfg.to_dict()["task"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        with tempfile.TemporaryDirectory() as d:
            if make_task(cfg.task).write_artifacts(d):
                name = "_".join(f"{k}={v}" for k, v in sorted(cfg.to_dict()["task"].items())
                                if k in ("num_profiles", "relations", "seed"))
                client.log_artifacts(run_id, d, os.path.join("data", name or f"task{len(seen)}"))


def _effective_steps(params: dict) -> int | None:
    from reasonlab.analysis.steps import STEP_KEYS

    for key in STEP_KEYS:
        if params.get(key) not in (None, "None", ""):
            return int(params[key])
    return None


def steps_rows(client, parent_run_id: str, grid: dict, baselines: dict[str, str]) -> tuple[list[dict], list[dict]]:
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


def steps_analysis(client, parent_run_id: str, grid: dict, baselines: dict[str, str]) -> str:
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
