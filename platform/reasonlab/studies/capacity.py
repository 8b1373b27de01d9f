"""The capacity study's table and plot (bits stored against parameters) on a sweep's parent run, or for
one run; recomputed from the runs' answer losses and profiles, without retraining."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from reasonlab.config import ConfigError
from reasonlab.tasks import TASKS

CAPACITY_CSV = "capacity.csv"
CAPACITY_PNG = "capacity_vs_params.png"
LOSSES_FILE = "answer_losses.parquet"


def _capacity_rows(client, run) -> list[dict]:
    """Capacity rows of one training run, from its answer losses and its profiles."""
    import pyarrow.parquet as pq

    from reasonlab.analysis.capacity import capacity_rows
    from reasonlab.tasks.profiles import PROFILES_FILE
    from reasonlab.tracking import logged_param_count

    run_id = run.info.run_id
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as d:
        losses = pq.read_table(client.download_artifacts(run_id, LOSSES_FILE, d)).to_pydict()
        schema = pq.read_schema(client.download_artifacts(run_id, f"data/{PROFILES_FILE}", d))
    stats = json.loads(schema.metadata[b"reasonlab.statistics"])
    rows = capacity_rows(losses, stats, logged_param_count(run.data.params),
                         logged_param_count(run.data.params, used=True))
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


class CapacityAnalysis:
    """capacity.csv and capacity_vs_params.png, when the study's task measures capacity."""

    name = "capacity"

    def applies(self, study) -> bool:
        return not study.eval_only and any(TASKS[cfg.task.name].measures_capacity for cfg in study.configs)

    def run(self, study) -> str:
        try:
            rows = capacity_table(study.client, study.parent_run_id)
        except ConfigError as e:  # no trial finished with its answer losses
            return f"no capacity table: {e}\n"
        with tempfile.TemporaryDirectory() as d:
            csv_path, png_path = write_capacity(rows, d)
            study.client.log_artifact(study.parent_run_id, str(csv_path))
            study.client.log_artifact(study.parent_run_id, str(png_path))
        return format_capacity(rows, "optimal") + f"({CAPACITY_CSV} and {CAPACITY_PNG} logged to the parent run)\n"
