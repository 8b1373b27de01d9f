"""Method comparison: every method trained (or taken from a finished run) on the same task, then every
final model evaluated on the same test set with the same evaluator, one at a time on the same resources,
at each evaluation batch size. One MLflow parent run holds the training runs, the evaluation runs,
`comparison.csv` and `accuracy_vs_speed.png` (studies/comparison.py).

    compare:                                     # label → a job to train, or a finished run
      nocot: {job: ../jobs/si_mult.yaml, overrides: ["method={name: nocot}"]}
      internalize: {job: ../jobs/si_mult.yaml}
      icot_kd: {job: ../jobs/icot_kd.yaml}       # a staged job: its last stage's model
      cot: {run: my-cot-run}                     # a finished run (id or name)
    overrides: [train.seed=1]                    # every job (optional)
    eval_batch_sizes: [1, 100]
    test_examples: 1000

`reasonlab sweep FILE KEY=VALUE ...`: overrides apply to every job; `compare.LABEL.run=RUN` takes a
finished run instead of training that job.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from reasonlab.config import Config, ConfigError, apply_overrides, config_from_dict, override_list
from reasonlab.runref import RunRef

COMPARE_KEYS = {"compare", "overrides", "eval_batch_sizes", "test_examples"}


@dataclass
class Entry:
    label: str
    job: object = None  # Config or stages.Pipeline to train
    run: RunRef | None = None  # or a finished run


@dataclass
class Comparison:
    name: str
    text: str
    entries: list[Entry]
    batch_sizes: list[int]
    test_examples: int
    lookup_cfg: Config = None  # tracking settings and task of the comparison
    resolved: dict[str, str] = field(default_factory=dict)  # label → run id, for entries naming runs


def load_comparison(path: Path, data: dict, cli_overrides: list[str]) -> Comparison:
    """A comparison file checked whole before anything starts: jobs valid, one task, runs finished."""
    from reasonlab.stages import Pipeline, load_job

    unknown = sorted(set(data) - COMPARE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown key; expected one of {sorted(COMPARE_KEYS)}")
    apply_overrides(data, [o for o in cli_overrides if o.startswith("compare.")])
    job_overrides = [o for o in cli_overrides if not o.startswith("compare.")]
    shared = override_list(data.get("overrides"), f"{path}: overrides")
    compare = data.get("compare")
    if not isinstance(compare, dict) or not compare:
        raise ConfigError(f"{path}: compare: expected a mapping of method labels to {{job: FILE}} or {{run: RUN}}")
    entries = []
    for label, spec in compare.items():
        where = f"{path}: compare.{label}"
        if not isinstance(spec, dict) or not ({"job", "run"} & set(spec)) or set(spec) - {"job", "run", "overrides"}:
            raise ConfigError(f"{where}: expected {{job: FILE, overrides: [...]}} or {{run: RUN_ID_OR_NAME}}")
        if spec.get("run") is not None:  # a finished run wins over its job
            entries.append(Entry(label, run=RunRef.parse(str(spec["run"]), f"{where}.run")))
            continue
        own = override_list(spec.get("overrides"), f"{where}.overrides")
        try:
            job = load_job((path.parent / str(spec["job"])).resolve(), [*shared, *own, *job_overrides])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        entries.append(Entry(label, job=job))
    sizes = data.get("eval_batch_sizes", [1, 100])
    if not isinstance(sizes, list) or not sizes or not all(isinstance(b, int) and b > 0 for b in sizes):
        raise ConfigError(f"{path}: eval_batch_sizes: expected a list of integers > 0, got {sizes!r}")
    count = data.get("test_examples", 1000)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"{path}: test_examples: expected an integer > 0, got {count!r}")

    configs = [(e.label, e.job.final.cfg if isinstance(e.job, Pipeline) else e.job) for e in entries if e.job]
    lookup = configs[0][1] if configs else config_from_dict({"task": {"name": "multiplication"}})
    for label, cfg in configs[1:]:  # one task, so one test set
        for key, value in cfg.flat().items():
            if key.startswith("task.") and lookup.flat()[key] != value:
                raise ConfigError(f"{path}: compare.{label}: {key}={value}, but compare.{configs[0][0]} has "
                                  f"{lookup.flat()[key]}; every method must answer the same test set")
    comparison = Comparison(path.stem, path.read_text(encoding="utf-8"), entries, sizes, count, lookup)
    _resolve(comparison, path, bool(configs))
    return comparison


def _resolve(comparison: Comparison, path: Path, have_task: bool) -> None:
    from reasonlab.tracking import lookup_client, resolve_ref

    first_task = None
    for e in comparison.entries:
        if e.run is None:
            continue
        what = f"{path}: compare.{e.label}.run"
        client = lookup_client(comparison.lookup_cfg, what, e.run.run)
        run = resolve_ref(client, comparison.lookup_cfg, e.run, what, ("task.",) if have_task else ())
        if e.run.step is not None:
            raise ConfigError(f"{what}: the comparison evaluates final models; drop @{e.run.step}")
        task = {k: v for k, v in run.data.params.items() if k.startswith("task.")}
        if first_task is not None and task != first_task[1]:
            raise ConfigError(f"{what}: run {e.run.run!r} was trained on another task than {first_task[0]!r}")
        first_task = first_task or (e.run.run, task)
        comparison.resolved[e.label] = run.info.run_id


def run_comparison(comparison: Comparison, out=sys.stdout) -> str:
    """Train what needs training, evaluate every final model at every batch size, log the table and the
    plot to the parent run; returns its run id."""
    from mlflow.tracking import MlflowClient

    from reasonlab.eval_run import evaluate_trained
    from reasonlab.stages import train_or_reuse
    from reasonlab.studies import Study, run_analyses
    from reasonlab.tracking import DriverRun

    name = f"{comparison.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    parent = DriverRun(comparison.lookup_cfg, name)
    parent.client.set_tag(parent.run_id, "reasonlab.sweep", comparison.name)
    parent.client.log_text(parent.run_id, comparison.text, "sweep.yaml")
    print(f"comparison {name}: {', '.join(e.label for e in comparison.entries)} on one test set "
          f"(MLflow parent run {parent.run_id})", file=out, flush=True)
    with parent.closing():
        trained = dict(comparison.resolved)
        for e in comparison.entries:
            if e.label in trained:
                print(f"{e.label}: the model of finished run {trained[e.label]}", file=out, flush=True)
                continue
            print(f"{e.label}: training", file=out, flush=True)
            trained[e.label] = train_or_reuse(e.job, f"{name}-{e.label}", parent.run_id, out=out)
        client = MlflowClient(parent.uri)
        for e in comparison.entries:  # one at a time, this process, every core
            cfg = _run_config(client, trained[e.label])
            for b in comparison.batch_sizes:
                tracking = {"uri": parent.uri, "experiment": comparison.lookup_cfg.tracking.experiment}
                cfg_b = cfg.replace(eval={"batch_size": b, "test_examples": comparison.test_examples},
                                    tracking=tracking)
                evaluate_trained(cfg_b, trained[e.label], f"{name}-{e.label}-bs{b}", parent.run_id,
                                 threads=os.cpu_count(), split="test")
        study = Study(client, parent.run_id, configs=[comparison.lookup_cfg], comparison=comparison, trained=trained)
        print(run_analyses(study), end="", file=out, flush=True)
    return parent.run_id


def _run_config(client, run_id: str) -> Config:
    """The config a run was trained with (its own config.yaml)."""
    from reasonlab.runs import CONFIG_FILE, read_run_config

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as d:
        return read_run_config(client.download_artifacts(run_id, CONFIG_FILE, d))
