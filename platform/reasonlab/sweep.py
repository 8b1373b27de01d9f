"""Search-space YAML → Ray Tune: every grid point is one Tune trial that fits one TorchTrainer (Train V2)
and logs into a child MLflow run of the sweep's parent run.

    base: ../jobs/quickstart.yaml     # the job every trial starts from (relative to this file)
    overrides: [train.max_steps=500]  # applied to every trial (optional)
    grid:                             # every combination of these values is one trial
      model.d_model: [64, 128]
      model.n_layer: [2, 4]
    max_concurrent_trials: 2          # optional; default: as many as the grid has

Every grid point is validated as a whole job before Ray starts.
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reasonlab.config import Config, ConfigError, load_config, read_yaml_mapping

SWEEP_KEYS = {"base", "overrides", "grid", "max_concurrent_trials"}
TRIAL_CPUS = 0.01  # a Tune trial only drives its trainer; {"CPU": 0} is refused by Tune


@dataclass
class Sweep:
    name: str
    base: Path
    overrides: list[str]
    grid: dict[str, list]
    max_concurrent_trials: int
    text: str = ""
    trials: list[list[str]] = field(default_factory=list)  # one override list per trial

    def trial_config(self, index: int, extra: list[str] = ()) -> Config:
        return load_config(self.base, [*self.overrides, *self.trials[index], *extra])


def _override(key: str, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_sweep(path: str | Path, cli_overrides: list[str] = ()) -> Sweep:
    """Read and validate a sweep file; every trial's job is validated too."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep", "base, grid, ...")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key; expected one of {sorted(SWEEP_KEYS)}")
    if not data.get("base"):
        raise ConfigError(f"{path}: base: required (the job file every trial starts from)")
    base = (path.parent / str(data["base"])).resolve()
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: overrides: expected a list of KEY=VALUE strings")
    grid = data.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid: empty; expected at least one parameter with a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key}: expected a non-empty list of values")
    trials = [[_override(k, v) for k, v in zip(grid, combo)] for combo in itertools.product(*grid.values())]
    concurrent = data.get("max_concurrent_trials", len(trials))
    if not isinstance(concurrent, int) or isinstance(concurrent, bool) or concurrent < 1:
        raise ConfigError(f"{path}: max_concurrent_trials: expected an integer > 0, got {concurrent!r}")
    sweep = Sweep(path.stem, base, [*overrides, *cli_overrides], grid, concurrent, path.read_text(), trials)
    for i in range(len(trials)):
        try:
            sweep.trial_config(i)
        except ConfigError as e:
            raise ConfigError(f"{path}: trial {' '.join(trials[i])}: {e}") from None
    return sweep


def run_sweep(sweep: Sweep) -> str:
    """Run every trial on Ray Tune; returns the parent MLflow run id."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from reasonlab.studies import log_task_artifacts, sweep_analyses
    from reasonlab.tracking import DriverRun, storage_path
    from reasonlab.train import run_training

    base_cfg = sweep.trial_config(0)
    sweep_name = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    parent = DriverRun(base_cfg, sweep_name)
    parent.client.set_tag(parent.run_id, "reasonlab.sweep", sweep.name)
    parent.client.log_text(parent.run_id, sweep.text, "sweep.yaml")
    log_task_artifacts(parent.client, parent.run_id, [sweep.trial_config(i) for i in range(len(sweep.trials))])
    print(f"sweep {sweep_name}: {len(sweep.trials)} trials, at most {sweep.max_concurrent_trials} at once "
          f"(MLflow parent run {parent.run_id})", flush=True)

    status = "FAILED"
    try:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")
        extra = []
        if base_cfg.scaling.cpus_per_worker is None and not base_cfg.scaling.use_gpu:
            # concurrent trials share the CPUs and leave Ray Data one whole CPU, after the trial
            # actors' own share, or its 1-CPU tasks never start (ray_and_mlflow.md §2.3)
            free = ray.cluster_resources().get("CPU", 1.0) - 1 - TRIAL_CPUS * sweep.max_concurrent_trials
            per_worker = math.floor(1000 * free / (sweep.max_concurrent_trials * base_cfg.scaling.num_workers)) / 1000
            extra.append(f"scaling.cpus_per_worker={max(0.05, per_worker)}")
        parent_id = parent.run_id

        def trial(config: dict) -> None:  # one Tune trial: one Train run, a child MLflow run
            index = config["trial"]
            cfg = sweep.trial_config(index, [*extra, f"tracking.run_name={sweep_name}-t{index}"])
            run_training(cfg, parent_run_id=parent_id, callbacks=[TuneReportCallback()])

        tuner = tune.Tuner(
            tune.with_resources(trial, {"CPU": TRIAL_CPUS}),  # the trial only drives its trainer
            param_space={"trial": tune.grid_search(list(range(len(sweep.trials))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=sweep_name, storage_path=storage_path(base_cfg), verbose=0),
        )
        grid = tuner.fit()
        table = summarize(parent, sweep, sweep_name)
        parent.client.log_text(parent.run_id, table, "trials.csv")
        print(table, end="")
        print(sweep_analyses(parent.client, parent.run_id), end="", flush=True)
        status = "FINISHED" if not grid.errors else "FAILED"
        if grid.errors:
            print(f"{len(grid.errors)} of {len(sweep.trials)} trials failed; see their runs", file=sys.stderr)
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise KeyboardInterrupt from None
    finally:
        parent.end(status)
        _close_children(parent)
    return parent.run_id


def _children(parent) -> list:
    return parent.client.search_runs([parent.experiment_id],
                                     filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")


def _close_children(parent) -> None:
    """A trial whose driver was killed cannot close its run; nothing is left RUNNING."""
    for run in _children(parent):
        if run.info.status == "RUNNING":
            parent.client.set_terminated(run.info.run_id, "KILLED")


def summarize(parent, sweep: Sweep, sweep_name: str) -> str:
    """trials.csv: one row per trial with its grid values, parameter count, status and final metrics."""
    runs = {r.info.run_name: r for r in _children(parent)}
    metrics = sorted({k for r in runs.values() for k in r.data.metrics})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *sweep.grid, "n_params", "status", *metrics, "run_id"])
    for index, combo in enumerate(itertools.product(*sweep.grid.values())):
        run = runs.get(f"{sweep_name}-t{index}")
        if run is None:
            writer.writerow([index, *combo, "", "NOT STARTED", *[""] * len(metrics), ""])
            continue
        writer.writerow([index, *combo, run.data.params.get("n_params", ""), run.info.status,
                         *[run.data.metrics.get(m, "") for m in metrics], run.info.run_id])
    return out.getvalue()
