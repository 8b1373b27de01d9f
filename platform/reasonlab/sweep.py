"""Search-space YAML → Ray Tune: every trial fits one TorchTrainer (Train V2) and logs into a child MLflow
run of the sweep's parent run.

    base: ../jobs/quickstart.yaml     # the job every trial starts from (relative to this file)
    overrides: [train.max_steps=500]  # applied to every trial (optional)
    grid:                             # every combination of these values is tried
      model.d_model: [64, 128]
      model.n_layer: [2, 4]
    sample:                           # drawn by Tune num_samples times, each draw tried at every grid point
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}   # also uniform: [lo, hi], randint: [lo, hi) and choice: [...]
    num_samples: 4
    seeds: 3                          # each configuration trained with train.seed, +1, +2 (optional)
    scheduler: {name: asha, metric: eval/accuracy, mode: max, grace_period: 200, reduction_factor: 2}
    max_concurrent_trials: 2          # optional; default: as many as there are trials
    sweep_name: lr-search             # optional: a fixed name, so running the file again resumes it

Tune draws the samples (its own search spaces), stops trials early (its ASHA scheduler, on the evaluations'
steps) and resumes an interrupted sweep (`Tuner.restore`, `reasonlab sweep FILE --resume NAME`) under the
same parent run. With seeds, the parent also gets configurations.csv: each configuration's final metrics as
the mean over its seeds with a 95% t-interval.

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

SWEEP_KEYS = {"base", "overrides", "grid", "sample", "num_samples", "seeds", "scheduler", "max_concurrent_trials",
              "sweep_name", "trained_run", "baselines"}
SEARCH_SPACES = {"choice": "a list of values", "uniform": "[low, high]", "loguniform": "[low, high], both > 0",
                 "randint": "[low, high), integers"}
SCHEDULERS = {"asha": ("metric", "mode", "grace_period", "reduction_factor")}  # Tune's ASHAScheduler
SEED_KEY = "train.seed"
STOPPED_EARLY_TAG = "reasonlab.stopped_early"  # on a trial's run: the step its scheduler stopped it at
SWEEP_NAME_TAG = "reasonlab.sweep_name"
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
    trials: list[list[str]] = field(default_factory=list)  # one override list per grid point
    sample: dict[str, tuple[str, list]] = field(default_factory=dict)  # key → (search space, its arguments)
    num_samples: int = 1
    seeds: int = 1
    scheduler: dict | None = None
    sweep_name: str | None = None  # a fixed name: running the file again resumes the sweep
    path: Path | None = None  # the sweep file, for the line that says how to resume
    trained_run: str | None = None  # run id of the model an eval-only sweep evaluates
    baselines: dict[str, str] = field(default_factory=dict)  # run id → name, drawn beside the trials
    # (job, overrides, label) of the baselines trained before the trials
    baseline_jobs: list[tuple[Path, list[str], str]] = field(default_factory=list)

    def trial_config(self, index: int, extra: list[str] = ()) -> Config:
        """Grid point `index` (the sampled keys at their base values)."""
        return load_config(self.base, [*self.overrides, *self.trials[index], *extra])

    def base_config(self, extra: list[str] = ()) -> Config:
        """The base job with the sweep's overrides and none of the grid's values."""
        return load_config(self.base, [*self.overrides, *extra])

    def tune_space(self) -> dict:
        """Tune's param_space: the grid point, the seed and the sampled values of one trial."""
        from ray import tune

        space = {"trial": tune.grid_search(list(range(len(self.trials))))}
        if self.seeds > 1:
            space["seed"] = tune.grid_search(list(range(self.seeds)))
        if self.sample:
            space["sample"] = {f"s{i}": getattr(tune, kind)(*([args] if kind == "choice" else args))
                               for i, (kind, args) in enumerate(self.sample.values())}
        return space

    def overrides_of(self, config: dict) -> list[str]:
        """The overrides of the trial Tune made from `config` (one point of tune_space)."""
        out = list(self.trials[config["trial"]])
        out += [_override(key, _plain(config["sample"][f"s{i}"])) for i, key in enumerate(self.sample)]
        if self.seeds > 1:
            out.append(f"{SEED_KEY}={self.base_config().train.seed + config['seed']}")
        return out

    def config_of(self, config: dict, extra: list[str] = ()) -> Config:
        return load_config(self.base, [*self.overrides, *self.overrides_of(config), *extra])

    @property
    def varied(self) -> list[str]:
        """Every key that differs between trials, as the trials' runs log it."""
        return [*self.grid, *self.sample, *([SEED_KEY] if self.seeds > 1 else [])]

    @property
    def num_trials(self) -> int:
        return len(self.trials) * self.seeds * self.num_samples

    @property
    def eval_only(self) -> bool:
        return all(key.startswith("eval.") or key in SAMPLING_KEYS for key in self.varied)


def _plain(value):
    """A value Tune drew (numpy scalars included) as a plain Python number."""
    return value.item() if hasattr(value, "item") else value


def _override(key: str, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _positive_int(data: dict, key: str, path: Path, default: int) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: {key}: expected an integer > 0, got {value!r}")
    return value


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _search_space(path: Path, key: str, spec) -> tuple[str, list]:
    """(Tune search space name, its arguments) of `sample.KEY`, checked."""
    where = f"{path}: sample.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_SPACES:
        kinds = ", ".join(f"{{{k}: {v}}}" for k, v in SEARCH_SPACES.items())
        raise ConfigError(f"{where}: expected one of {kinds}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice: expected a non-empty list of values")
        return kind, args
    if not isinstance(args, list) or len(args) != 2 or not all(_finite(a) for a in args) or args[0] >= args[1]:
        raise ConfigError(f"{where}: {kind}: expected {SEARCH_SPACES[kind]} with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{where}: loguniform: expected bounds > 0, got {args!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where}: randint: expected integer bounds, got {args!r}")
    return kind, args


def _scheduler(path: Path, spec) -> dict | None:
    """The `scheduler:` mapping, checked: a Tune scheduler's name and its settings."""
    if spec is None:
        return None
    where = f"{path}: scheduler"
    if not isinstance(spec, dict) or spec.get("name") not in SCHEDULERS:
        raise ConfigError(f"{where}: expected a mapping with name: one of {sorted(SCHEDULERS)}; got {spec!r}")
    unknown = sorted(set(spec) - {"name", *SCHEDULERS[spec["name"]]})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected {list(SCHEDULERS[spec['name']])}")
    spec = {"mode": "max", "grace_period": 1, "reduction_factor": 2, **spec}
    metric = spec.get("metric")
    if not isinstance(metric, str) or not (metric.startswith("eval/") or metric == "train/loss"):
        raise ConfigError(f"{where}.metric: expected a metric the trials report at each evaluation "
                          f"(eval/accuracy, another eval/... metric, or train/loss); got {metric!r}")
    if spec["mode"] not in ("max", "min"):
        raise ConfigError(f"{where}.mode: expected max or min, got {spec['mode']!r}")
    if not isinstance(spec["grace_period"], int) or isinstance(spec["grace_period"], bool) \
            or spec["grace_period"] < 1:
        raise ConfigError(f"{where}.grace_period: expected a number of steps > 0, got {spec['grace_period']!r}")
    if not _finite(spec["reduction_factor"]) or spec["reduction_factor"] <= 1:
        raise ConfigError(f"{where}.reduction_factor: expected a number > 1, got {spec['reduction_factor']!r}")
    return spec


def load_sweep(path: str | Path, cli_overrides: list[str] = ()):
    """Read and validate a sweep file (a Sweep, or a compare.Comparison); every trial's job is validated too
    (a sampled key at each end of its range, and each of its choices)."""
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
    grid, sample = data.get("grid", {}), data.get("sample", {})
    if not isinstance(sample, dict):
        raise ConfigError(f"{path}: sample: expected a mapping of keys to search spaces")
    if not isinstance(grid, dict) or not (grid or sample):
        raise ConfigError(f"{path}: grid: empty; expected at least one parameter with a list of values "
                          f"(or sample:)")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key}: expected a non-empty list of values")
    both = sorted(set(grid) & set(sample))
    if both:
        raise ConfigError(f"{path}: {both[0]}: in both grid and sample; give it in one")
    sample = {key: _search_space(path, key, spec) for key, spec in sample.items()}
    trials = [[_override(k, v) for k, v in zip(grid, combo)] for combo in itertools.product(*grid.values())]
    seeds, num_samples = _positive_int(data, "seeds", path, 1), _positive_int(data, "num_samples", path, 1)
    if num_samples > 1 and not sample:
        raise ConfigError(f"{path}: num_samples: {num_samples} draws need sample: (a grid is tried once)")
    if seeds > 1 and SEED_KEY in [*grid, *sample]:
        raise ConfigError(f"{path}: seeds: {SEED_KEY} is also varied by the sweep; give one or the other")
    concurrent = _positive_int(data, "max_concurrent_trials", path, len(trials) * seeds * num_samples)
    sweep_name = data.get("sweep_name")
    if sweep_name is not None and (not isinstance(sweep_name, str) or not sweep_name.strip()
                                   or not all(c.isalnum() or c in "-_." for c in sweep_name)):
        raise ConfigError(f"{path}: sweep_name: expected a name of letters, digits, '-', '_' and '.'; "
                          f"got {sweep_name!r}")
    text = path.read_text(encoding="utf-8")  # read_yaml_mapping has checked it is UTF-8
    sweep = Sweep(path.stem, base, [*overrides, *cli_overrides], grid, concurrent, text, trials, sample,
                  num_samples, seeds, _scheduler(path, data.get("scheduler")), sweep_name, path)
    hub_models = set()
    # every grid point with the sampled keys at their first values; the first with each sampled value's ends
    checks = [(i, [_override(key, args[0]) for key, (_, args) in sample.items()]) for i in range(len(trials))]
    checks += [(0, [_override(key, value)]) for key, (kind, args) in sample.items()
               for value in (args if kind == "choice" else [args[0], args[1] - (kind == "randint")])]
    for i, extra in checks:
        try:
            cfg = sweep.trial_config(i, extra)
        except ConfigError as e:
            raise ConfigError(f"{path}: trial {' '.join([*trials[i], *extra])}: {e}") from None
        if cfg.model.pretrained and not os.path.isabs(cfg.model.pretrained):  # local folders are absolute now
            hub_models.add(cfg.model.pretrained)
    if sweep.scheduler is not None:
        if sweep.eval_only:
            raise ConfigError(f"{path}: scheduler: stops trainings early; this sweep only evaluates one model")
        if sweep.scheduler["grace_period"] > sweep.base_config().train.max_steps:
            raise ConfigError(f"{path}: scheduler.grace_period: {sweep.scheduler['grace_period']} is past "
                              f"train.max_steps={sweep.base_config().train.max_steps}")
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


def run_sweep(sweep, resume: str | None = None) -> str:
    """Run every trial on Ray Tune, each logged as a child run of one parent run; returns the parent
    MLflow run id. `resume` (or the file's sweep_name) names an interrupted sweep to continue."""
    from reasonlab.compare import Comparison, run_comparison

    if isinstance(sweep, Comparison):
        if resume:
            raise ConfigError("--resume: a comparison resumes by running it again (finished methods are reused)")
        return run_comparison(sweep)
    from reasonlab.tracking import storage_path, tracking_uri

    base_cfg = sweep.base_config() if sweep.eval_only else sweep.trial_config(0)
    # trial actors may not see the driver's environment: they log where the driver does
    pinned = [f"tracking.uri={tracking_uri(base_cfg)}", f"tracking.storage_path={storage_path(base_cfg)}"]
    sweep_name = resume or sweep.sweep_name or f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    state = os.path.join(storage_path(base_cfg), sweep_name)
    check_resumable(sweep, sweep_name, base_cfg, state, required=resume is not None)  # before Ray starts
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from reasonlab.stopping import connect, done, on_stop, tune_interruption
    from reasonlab.studies import log_task_artifacts
    from reasonlab.tracking import DriverRun

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    connect()
    check_trial_resources(sweep, base_cfg)  # before the parent run exists: nothing is left to close
    restoring = tune.Tuner.can_restore(state)
    parent = DriverRun(base_cfg, sweep_name)  # a sweep's parent of this name is resumed
    children = on_stop(lambda: _close_children(parent))  # SIGTERM: the trials' runs too, before Tune stops them
    status = "FAILED"
    try:  # from here on the parent run and its children are closed however the sweep stops
        if not parent.resumed:
            parent.client.set_tag(parent.run_id, "reasonlab.sweep", sweep.name)
            parent.client.log_text(parent.run_id, sweep.text, "sweep.yaml")
            if not sweep.eval_only:
                log_task_artifacts(parent.client, parent.run_id,
                                   [sweep.trial_config(i) for i in range(len(sweep.trials))])
        what = "evaluations of one model" if sweep.eval_only else "trials"
        print(f"sweep {sweep_name}: {'resuming ' if restoring else ''}{sweep.num_trials} {what}, at most "
              f"{sweep.max_concurrent_trials} at once (MLflow parent run {parent.run_id}); if it stops, "
              f"resume it with: {resume_command(sweep, sweep_name)}", flush=True)
        plan = _evaluation_trials if sweep.eval_only else _training_trials
        trial, resources, analyses = plan(sweep, sweep_name, parent, base_cfg, pinned)
        trainable = tune.with_resources(trial, resources)
        if restoring:  # Tune's own restore: finished trials kept, the others rerun and resume their runs
            tuner = tune.Tuner.restore(state, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=sweep.tune_space(),
                tune_config=tune.TuneConfig(
                    num_samples=sweep.num_samples, scheduler=make_scheduler(sweep.scheduler, base_cfg),
                    # Tune's grid and sampling, seeded by the base job's train.seed: the same file draws the
                    # same samples; each draw is kept across the grid and the seeds (constant_grid_search), so
                    # seeds repeat one configuration. This generator holds the concurrency limit (TuneConfig's
                    # would be ignored beside it).
                    search_alg=BasicVariantGenerator(random_state=base_cfg.train.seed, constant_grid_search=True,
                                                     max_concurrent=sweep.max_concurrent_trials)),
                run_config=tune.RunConfig(name=sweep_name, storage_path=storage_path(base_cfg), verbose=0,
                                          callbacks=[TrialProgress(sweep.num_trials)]),
            )
        with tune_interruption() as interrupted:
            results = tuner.fit()
        # Tune's Ctrl-C handler ends fit() normally, its running trials TERMINATED
        if any(interrupted) or results.num_terminated + results.num_errors < sweep.num_trials:
            raise KeyboardInterrupt
        for line in close_stopped_trials(parent, results, sweep, sweep_name):
            print(line, flush=True)
        table = summarize(parent, sweep, sweep_name)
        parent.client.log_text(parent.run_id, table, "trials.csv")
        print(table, end="")
        if sweep.seeds > 1:
            configurations = aggregate_seeds(table, sweep)
            parent.client.log_text(parent.run_id, configurations, "configurations.csv")
            print(f"over {sweep.seeds} seeds (mean, 95% interval):\n{configurations}", end="")
        print(analyses(), end="", flush=True)
        status = "FINISHED" if not results.errors else "FAILED"
        if results.errors:
            print(f"{len(results.errors)} of {sweep.num_trials} trials failed; see their runs", file=sys.stderr)
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        print(f"sweep {sweep_name} stopped, its runs closed as KILLED; resume it with: "
              f"{resume_command(sweep, sweep_name)}", file=sys.stderr, flush=True)
        raise KeyboardInterrupt from None
    finally:
        done(children)
        parent.end(status)
        _close_children(parent)
    return parent.run_id


def resume_command(sweep: Sweep, sweep_name: str) -> str:
    return f"reasonlab sweep {sweep.path or sweep.name + '.yaml'} --resume {sweep_name}"


def check_resumable(sweep: Sweep, sweep_name: str, cfg: Config, state: str, required: bool) -> None:
    """A sweep to resume (`required`: named by --resume) is this file's, unfinished, with Tune's state on disk;
    a fixed sweep_name whose sweep finished is refused. ConfigError otherwise."""
    from reasonlab.tracking import RUN_NAME_TAG, lookup_client

    try:
        client = lookup_client(cfg, "--resume", sweep_name)
    except ConfigError:  # no store yet
        client = None
    experiment = client and client.get_experiment_by_name(cfg.tracking.experiment)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{sweep_name}'", max_results=1)
    if not runs:
        if required:
            raise ConfigError(f"--resume: no sweep named {sweep_name!r} in experiment {cfg.tracking.experiment!r}")
        return
    run = runs[0]
    if run.data.tags.get("reasonlab.sweep") != sweep.name:
        raise ConfigError(f"--resume: {sweep_name!r} is not a sweep of {sweep.name}.yaml "
                          f"(run {run.info.run_id}, sweep {run.data.tags.get('reasonlab.sweep')!r})")
    if run.info.status == "FINISHED":
        raise ConfigError(f"{sweep_name}: sweep already finished (MLflow run {run.info.run_id}); "
                          f"{'nothing to resume' if required else 'change sweep_name to run it again'}")
    if not os.path.isdir(state):
        raise ConfigError(f"--resume: {sweep_name}: no Tune state at {state} to resume from")


def TrialProgress(total: int):
    """A Tune callback on the driver: a progress bar of the sweep's trials (done of all, running, pending). It is
    part of the Tuner's saved run config, so a restored sweep shows it too."""
    from ray.tune import Callback
    from tqdm import tqdm

    class Progress(Callback):
        def __init__(self) -> None:
            self.bar = None

        def _show(self, trials) -> None:
            if self.bar is None:
                self.bar = tqdm(total=total, desc="trials", unit="trial", file=sys.stderr, dynamic_ncols=True)
            count = {s: sum(t.status == s for t in trials) for s in ("TERMINATED", "ERROR", "RUNNING", "PENDING")}
            self.bar.n = count["TERMINATED"] + count["ERROR"]
            self.bar.set_postfix({"running": count["RUNNING"], "pending": count["PENDING"] + total - len(trials),
                                  "failed": count["ERROR"]}, refresh=False)
            self.bar.refresh()

        def on_trial_start(self, iteration, trials, trial, **info):
            self._show(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._show(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._show(trials)

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self._show(trials)
                self.bar.close()

    return Progress()


def make_scheduler(spec: dict | None, cfg: Config):
    """Tune's scheduler for the `scheduler:` mapping; trials report after every evaluation, at their step."""
    if spec is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # a trial that reaches max_steps is left to finish (its test evaluation and model come after its last report)
    return ASHAScheduler(time_attr="step", metric=spec["metric"], mode=spec["mode"], max_t=cfg.train.max_steps,
                         grace_period=spec["grace_period"], reduction_factor=spec["reduction_factor"],
                         stop_last_trials=False)


def trial_run_name(sweep_name: str, trial_id: str | None = None) -> str:
    """The run name of trial `trial_id` (this trial's, inside one): the sweep's name and the trial's number, Tune's
    trial counter at the end of its id, which a restore keeps."""
    if trial_id is None:
        from ray import tune

        trial_id = tune.get_context().get_trial_id()
    return f"{sweep_name}-t{int(trial_id.rpartition('_')[2])}"


def close_stopped_trials(parent, results, sweep: Sweep, sweep_name: str) -> list[str]:
    """Trials the scheduler stopped (their last result is before their max_steps): their runs end KILLED, tagged with
    the step they were stopped at, whether their actor was gone before the run could close (RUNNING) or the run
    got further while Tune was stopping it. Returns a line for each."""
    runs = {r.info.run_name: r for r in _children(parent)}
    lines = []
    for result in results:
        if result.error is not None or "trial_id" not in result.metrics or result.metrics.get("step") is None:
            continue
        step = int(result.metrics["step"])
        if step >= sweep.config_of(result.config).train.max_steps:
            continue
        name = trial_run_name(sweep_name, result.metrics["trial_id"])
        if name in runs:
            parent.client.set_tag(runs[name].info.run_id, STOPPED_EARLY_TAG, str(step))
            parent.client.set_terminated(runs[name].info.run_id, "KILLED")
            lines.append(f"{name}: stopped early at step {step} by the scheduler (run KILLED)")
    return lines


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
        # concurrent trials share the CPUs and leave Ray Data's generators one whole CPU, after the trial
        # actors' own share: they reserve none (reasonlab.data.train_dataset) but need a core to keep up
        free = ray.cluster_resources().get("CPU", 1.0) - 1 - TRIAL_CPUS * sweep.max_concurrent_trials
        per_worker = math.floor(1000 * free / (sweep.max_concurrent_trials * base_cfg.scaling.num_workers)) / 1000
        extra.append(f"scaling.cpus_per_worker={max(0.05, per_worker)}")
    parent_id = parent.run_id

    def trial(config: dict) -> None:  # one Tune trial: one Train run, a child MLflow run
        cfg = sweep.config_of(config, [*extra, f"tracking.run_name={trial_run_name(sweep_name)}"])
        run_training(cfg, parent_run_id=parent_id, callbacks=[TuneReportCallback()])

    # the trial only drives its trainer
    configs = [sweep.trial_config(i) for i in range(len(sweep.trials))]
    study = Study(parent.client, parent_id, configs, sweep.varied)
    return trial, {"CPU": TRIAL_CPUS}, lambda: run_analyses(study)


def _evaluation_trials(sweep: Sweep, sweep_name: str, parent, base_cfg: Config, pinned: list[str]) -> tuple:
    """Train the base job once (unless `trained_run` names a model) and the baseline jobs; then
    (trial function, its resources, the parent's analyses) where each trial evaluates that model."""
    from ray import tune

    from reasonlab.eval_run import TRAINED_RUN_TAG, evaluate_trained
    from reasonlab.stages import train_or_reuse
    from reasonlab.studies import Study, run_analyses

    trained = sweep.trained_run
    if trained is None:  # trained like any stage: a finished run of that name would be reused
        print(f"training {sweep.base.name} once for all {sweep.num_trials} evaluations", flush=True)
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
        name = trial_run_name(sweep_name)
        tune.report(evaluate_trained(sweep.config_of(config, pinned), trained, name, parent_id, threads=threads))

    study = Study(parent.client, parent_id, [base_cfg], sweep.varied, eval_only=True,
                  baselines=baselines)
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
    """trials.csv: one row per trial with the values that vary, parameter count, status, the step a scheduler
    stopped it at, and its final metrics."""
    from reasonlab.tracking import PARAM_COUNT, logged_param_count

    prefix = f"{sweep_name}-t"
    runs = {int(r.info.run_name[len(prefix):]): r for r in _children(parent)
            if r.info.run_name.startswith(prefix) and r.info.run_name[len(prefix):].isdigit()}
    metrics = sorted({k for r in runs.values() for k in r.data.metrics})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *sweep.varied, PARAM_COUNT, "status", "stopped_at", *metrics, "run_id"])
    for index in range(max(sweep.num_trials, max(runs, default=-1) + 1)):
        run = runs.get(index)
        if run is None:
            writer.writerow([index, *[""] * len(sweep.varied), "", "NOT STARTED", "", *[""] * len(metrics), ""])
            continue
        writer.writerow([index, *[run.data.params.get(k, "") for k in sweep.varied],
                         logged_param_count(run.data.params) or "", run.info.status,
                         run.data.tags.get(STOPPED_EARLY_TAG, ""),
                         *[run.data.metrics.get(m, "") for m in metrics], run.info.run_id])
    return out.getvalue()


def aggregate_seeds(table: str, sweep: Sweep) -> str:
    """configurations.csv: per configuration (the varied values but the seed), how many seeds finished and each
    final metric's mean over them with the half-width of its 95% t-interval (`METRIC±`)."""
    from reasonlab.analysis.intervals import mean_interval

    rows = [r for r in csv.DictReader(io.StringIO(table)) if r["status"] == "FINISHED"]
    keys = [k for k in sweep.varied if k != SEED_KEY]
    header = next(csv.reader(io.StringIO(table)))
    metrics = header[header.index("stopped_at") + 1: header.index("run_id")]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*keys, "seeds", *[f"{m}{suffix}" for m in metrics for suffix in ("", "±")]])
    for values, group in groups.items():
        cells = []
        for m in metrics:
            mean, half = mean_interval([float(r[m]) for r in group if r[m] != ""])
            cells += ["" if math.isnan(mean) else f"{mean:.6g}", "" if math.isnan(half) else f"{half:.6g}"]
        writer.writerow([*values, len(group), *cells])
    return out.getvalue()
