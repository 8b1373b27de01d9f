"""Search-space YAML → Ray Tune: every grid point is one Tune trial that fits one TorchTrainer (Train V2)
and logs into a child MLflow run of the sweep's parent run.

    base: ../jobs/quickstart.yaml     # the job every trial starts from (relative to this file)
    overrides: [train.max_steps=500]  # applied to every trial (optional)
    grid:                             # every combination of these values is one trial
      model.d_model: [64, 128]
      model.n_layer: [2, 4]
    max_concurrent_trials: 2          # optional; default: as many as the grid has

A grid that only varies how a model is evaluated (`eval.*`, `method.sampler`, `method.steps`,
`method.greedy`) is an eval-only sweep: the base job is trained once (or the model is taken from the
finished run `trained_run:` names), and every trial evaluates that model in a child run. Its parent
run gets steps.csv and steps_vs_accuracy.png when the grid varies the diffusion steps T, with the
finished runs listed under `baselines:` (e.g. autoregressive CoT and no-CoT) on the same plot.

Every grid point is validated as a whole job before Ray starts, and the runs named exist.
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

from reasonlab.config import Config, ConfigError, load_config, override_list, read_yaml_mapping
from reasonlab.models.hub import check_hub_model
from reasonlab.runref import RunRef

SWEEP_KEYS = {"base", "overrides", "grid", "max_concurrent_trials", "trained_run", "baselines"}
SAMPLING_KEYS = {"method.sampler", "method.steps", "method.greedy"}  # change generation, not training
BASELINE_SHARED = ("task.", "eval.", "tracking.", "scaling.")
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
    trained_run: str | None = None  # run id of the model an eval-only sweep evaluates
    baselines: dict[str, str] = field(default_factory=dict)  # run id → name, drawn beside the trials
    # (job, overrides, label) of the baselines trained before the trials
    baseline_jobs: list[tuple[Path, list[str], str]] = field(default_factory=list)

    def trial_config(self, index: int, extra: list[str] = ()) -> Config:
        return load_config(self.base, [*self.overrides, *self.trials[index], *extra])

    def base_config(self, extra: list[str] = ()) -> Config:
        """The base job with the sweep's overrides and none of the grid's values."""
        return load_config(self.base, [*self.overrides, *extra])

    @property
    def eval_only(self) -> bool:
        return all(key.startswith("eval.") or key in SAMPLING_KEYS for key in self.grid)


def _override(key: str, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_sweep(path: str | Path, cli_overrides: list[str] = ()):
    """Read and validate a sweep file (a Sweep, or a compare.Comparison); every trial's job is validated too."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep", "base, grid, ...")
    if "compare" in data:  # a method comparison (compare.py)
        from reasonlab.compare import load_comparison

        return load_comparison(path, data, list(cli_overrides))
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key; expected one of {sorted(SWEEP_KEYS)}")
    if not data.get("base"):
        raise ConfigError(f"{path}: base: required (the job file every trial starts from)")
    base = (path.parent / str(data["base"])).resolve()
    overrides = override_list(data.get("overrides"), f"{path}: overrides")
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
    text = path.read_text(encoding="utf-8")  # read_yaml_mapping has checked it is UTF-8
    sweep = Sweep(path.stem, base, [*overrides, *cli_overrides], grid, concurrent, text, trials)
    hub_models = set()
    for i in range(len(trials)):
        try:
            cfg = sweep.trial_config(i)
        except ConfigError as e:
            raise ConfigError(f"{path}: trial {' '.join(trials[i])}: {e}") from None
        if cfg.model.pretrained and not os.path.isabs(cfg.model.pretrained):  # local folders are absolute now
            hub_models.add(cfg.model.pretrained)
    for repo_id in sorted(hub_models):  # asked once here, not in every trial after Ray has started
        try:
            check_hub_model(repo_id)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    _resolve_runs(sweep, data, path)
    return sweep


def _resolve_runs(sweep: Sweep, data: dict, path: Path) -> None:
    """`trained_run` and `baselines`: checked against MLflow before anything starts."""
    trained, baselines = data.get("trained_run"), data.get("baselines") or []
    if trained is None and not baselines:
        return
    if not isinstance(baselines, list) or not all(isinstance(b, str) and b.strip() for b in baselines):
        raise ConfigError(f"{path}: baselines: expected a list of run ids, run names or job files")
    if not sweep.eval_only:
        keys = [k for k in sweep.grid if not (k.startswith("eval.") or k in SAMPLING_KEYS)]
        raise ConfigError(f"{path}: trained_run/baselines need an eval-only grid (eval.* and {sorted(SAMPLING_KEYS)}); "
                          f"{keys[0]} changes training")
    if trained is not None and not isinstance(trained, str):
        raise ConfigError(f"{path}: trained_run: expected a run id or run name, got {trained!r}")
    refs = []
    # a baseline job gets the sweep's task, tracking and scaling overrides, so it answers the same
    # questions; and its eval settings, except the diffusion steps
    shared = [o for o in sweep.overrides if o.startswith(BASELINE_SHARED) and not o.startswith("eval.steps=")]
    for ref in baselines:
        job, *job_overrides = ref.split()
        job_overrides = [*shared, *job_overrides]
        if job.endswith((".yaml", ".yml")):  # a job to train first: "../jobs/x.yaml key=value ..."
            job_path = (path.parent / job).resolve()
            try:
                load_config(job_path, job_overrides)
            except ConfigError as e:
                raise ConfigError(f"{path}: baselines: {ref}: {e}") from None
            sweep.baseline_jobs.append((job_path, job_overrides, " ".join([job_path.name, *ref.split()[1:]])))
        else:
            refs.append(ref)
    if trained is None and not refs:
        return
    from reasonlab.tracking import check_same_params, find_run, lookup_client, resolve_ref

    cfg = sweep.base_config()
    what = f"{path}: {'trained_run' if trained is not None else 'baselines'}"
    client = lookup_client(cfg, what, trained if trained is not None else refs[0])
    if trained is not None:  # a run reference like any other: finished, with a model, same task and method
        ref = RunRef.parse(trained, f"{path}: trained_run")
        run = resolve_ref(client, cfg, ref, f"{path}: trained_run", ("task.", "method."), ignore=SAMPLING_KEYS)
        sweep.trained_run = run.info.run_id
    for ref in refs:  # drawn beside the trials from their metrics; no model needed
        run = find_run(client, cfg.tracking.experiment, ref, f"{path}: baselines")
        if "eval/accuracy" not in run.data.metrics:
            raise ConfigError(f"{path}: baselines: run {ref!r} has no eval/accuracy to compare with")
        check_same_params(run, ref, cfg, ("task.",), f"{path}: baselines")
        sweep.baselines[run.info.run_id] = run.info.run_name


def run_sweep(sweep) -> str:
    """Run every trial on Ray Tune, each logged as a child run of one parent run; returns the parent
    MLflow run id."""
    from reasonlab.compare import Comparison, run_comparison

    if isinstance(sweep, Comparison):
        return run_comparison(sweep)
    import ray
    from ray import tune

    from reasonlab.studies import log_task_artifacts
    from reasonlab.tracking import DriverRun, storage_path, tracking_uri

    base_cfg = sweep.base_config() if sweep.eval_only else sweep.trial_config(0)
    # trial actors may not see the driver's environment: they log where the driver does
    pinned = [f"tracking.uri={tracking_uri(base_cfg)}", f"tracking.storage_path={storage_path(base_cfg)}"]
    sweep_name = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")
    check_trial_resources(sweep, base_cfg)  # before the parent run exists: nothing is left to close
    parent = DriverRun(base_cfg, sweep_name)
    status = "FAILED"
    try:  # from here on the parent run and its children are closed however the sweep stops
        parent.client.set_tag(parent.run_id, "reasonlab.sweep", sweep.name)
        parent.client.log_text(parent.run_id, sweep.text, "sweep.yaml")
        if not sweep.eval_only:
            log_task_artifacts(parent.client, parent.run_id,
                               [sweep.trial_config(i) for i in range(len(sweep.trials))])
        what = "evaluations of one model" if sweep.eval_only else "trials"
        print(f"sweep {sweep_name}: {len(sweep.trials)} {what}, at most {sweep.max_concurrent_trials} at once "
              f"(MLflow parent run {parent.run_id})", flush=True)
        plan = _evaluation_trials if sweep.eval_only else _training_trials
        trial, resources, analyses = plan(sweep, sweep_name, parent, base_cfg, pinned)
        tuner = tune.Tuner(
            tune.with_resources(trial, resources),
            param_space={"trial": tune.grid_search(list(range(len(sweep.trials))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=sweep_name, storage_path=storage_path(base_cfg), verbose=0),
        )
        grid = tuner.fit()
        table = summarize(parent, sweep, sweep_name)
        parent.client.log_text(parent.run_id, table, "trials.csv")
        print(table, end="")
        print(analyses(), end="", flush=True)
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


def check_trial_resources(sweep: Sweep, base_cfg: Config) -> None:
    """ConfigError naming the sweep if the cluster can never hold a trial's workers (cluster.py): Tune would keep
    every such trial pending, and Train retry its worker group, forever."""
    import ray

    from reasonlab.cluster import check_cluster_resources
    from reasonlab.train import worker_resources

    cpus = ray.available_resources().get("CPU", 1.0)
    if sweep.eval_only:  # one trial actor per evaluation
        requests = [(evaluation_resources(base_cfg), 1)]
    else:
        configs = [sweep.trial_config(i) for i in range(len(sweep.trials))]
        requests = [(worker_resources(cfg, cpus), cfg.scaling.num_workers) for cfg in configs]
    check_cluster_resources(requests, where=f"sweep {sweep.name}: ")


def _training_trials(sweep: Sweep, sweep_name: str, parent, base_cfg: Config, pinned: list[str]) -> tuple:
    """(trial function, its resources, the parent's analyses) when every trial trains a model."""
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback

    from reasonlab.studies import Study, run_analyses
    from reasonlab.train import run_training

    extra = list(pinned)
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

    # the trial only drives its trainer
    configs = [sweep.trial_config(i) for i in range(len(sweep.trials))]
    return trial, {"CPU": TRIAL_CPUS}, lambda: run_analyses(Study(parent.client, parent_id, configs, sweep.grid))


def _evaluation_trials(sweep: Sweep, sweep_name: str, parent, base_cfg: Config, pinned: list[str]) -> tuple:
    """Train the base job once (unless `trained_run` names a model) and the baseline jobs; then
    (trial function, its resources, the parent's analyses) where each trial evaluates that model."""
    from ray import tune

    from reasonlab.eval_run import TRAINED_RUN_TAG, evaluate_trained
    from reasonlab.stages import train_or_reuse
    from reasonlab.studies import Study, run_analyses

    trained = sweep.trained_run
    if trained is None:  # trained like any stage: a finished run of that name would be reused
        print(f"training {sweep.base.name} once for all {len(sweep.trials)} evaluations", flush=True)
        trained = train_or_reuse(sweep.base_config(), f"{sweep_name}-train")
    else:
        print(f"evaluating the model of run {trained}", flush=True)
    parent.client.set_tag(parent.run_id, TRAINED_RUN_TAG, trained)
    baselines = dict(sweep.baselines)
    for i, (job, overrides, label) in enumerate(sweep.baseline_jobs):
        print(f"training baseline {label}", flush=True)
        baselines[train_or_reuse(load_config(job, overrides), f"{sweep_name}-baseline{i}")] = label
    parent_id = parent.run_id
    resources = evaluation_resources(base_cfg)
    # the machine's cores shared by the trials that run at once
    threads = base_cfg.scaling.torch_threads or max(1, (os.cpu_count() or 1) // sweep.max_concurrent_trials)

    def trial(config: dict) -> None:  # one Tune trial: one evaluation, a child MLflow run
        index = config["trial"]
        cfg = sweep.trial_config(index, pinned)
        tune.report(evaluate_trained(cfg, trained, f"{sweep_name}-t{index}", parent_id, threads=threads))

    study = Study(parent.client, parent_id, [base_cfg], sweep.grid, eval_only=True, baselines=baselines)
    return trial, resources, lambda: run_analyses(study)


def evaluation_resources(cfg: Config) -> dict:
    """What one evaluation trial asks Tune for."""
    scaling = cfg.scaling
    return {"CPU": scaling.cpus_per_worker or 1.0, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}


def _children(parent) -> list:
    from reasonlab.tracking import child_runs

    return child_runs(parent.client, parent.experiment_id, parent.run_id)


def _close_children(parent) -> None:
    """A trial whose driver was killed cannot close its run; nothing is left RUNNING."""
    for run in _children(parent):
        if run.info.status == "RUNNING":
            parent.client.set_terminated(run.info.run_id, "KILLED")


def summarize(parent, sweep: Sweep, sweep_name: str) -> str:
    """trials.csv: one row per trial with its grid values, parameter count, status and final metrics."""
    from reasonlab.tracking import PARAM_COUNT, logged_param_count

    runs = {r.info.run_name: r for r in _children(parent)}
    metrics = sorted({k for r in runs.values() for k in r.data.metrics})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *sweep.grid, PARAM_COUNT, "status", *metrics, "run_id"])
    for index, combo in enumerate(itertools.product(*sweep.grid.values())):
        run = runs.get(f"{sweep_name}-t{index}")
        if run is None:
            writer.writerow([index, *combo, "", "NOT STARTED", *[""] * len(metrics), ""])
            continue
        writer.writerow([index, *combo, logged_param_count(run.data.params) or "", run.info.status,
                         *[run.data.metrics.get(m, "") for m in metrics], run.info.run_id])
    return out.getvalue()
