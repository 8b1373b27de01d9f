"""Staged jobs: one job file whose `stages:` are jobs run in turn, each stage's model available to the
later ones, tracked as one MLflow parent run with a child run per stage.

    task: {...}            # sections shared by every stage
    model: {...}
    train: {...}
    stages:
      teacher:  {method: {name: cot}, train: {max_steps: 3000}}
      student:  {method: {name: kd_student, teacher: teacher}}      # a stage's name: its model
      emulator: {method: {name: kd_emulator, teacher: teacher, student: student}}
      coupled:  {method: {name: kd_coupled, student: student, emulator: emulator}}

A stage is the shared sections with its own merged in (its `method:` replaces the shared one). A run
reference (`method.teacher: ...`) that names a stage of the job means that stage's model; anything else
is a finished run's id or name, e.g. to reuse one teacher for several students. Command-line overrides
apply to every stage (`train.max_steps=50` shortens them all; a `method.KEY` override to the stages whose
method has KEY), `stages.NAME.KEY=VALUE` to one, and `stages.NAME=null` drops a stage whose model a finished
run provides instead. Stages run in dependency order; a pipeline restarted
with the same `tracking.run_name` skips its finished stages and resumes the unfinished one from its
checkpoints. Every stage, reference and order is checked before anything starts.

Train-then-evaluate sweeps (the base job and its baselines) and the method comparison train through
`train_or_reuse` here as well: a finished run of that name is reused, anything else is (re)started.
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from reasonlab.config import Config, ConfigError, apply_overrides, config_from_dict, read_yaml_mapping

STAGES_TAG = "reasonlab.stages"


@dataclass
class Stage:
    name: str
    cfg: Config
    needs: dict[str, str] = field(default_factory=dict)  # method field → the stage whose model it reads


@dataclass
class Pipeline:
    job: str  # the job file's stem
    text: str  # the job file, logged with the parent run
    stages: list[Stage]  # in the order they run
    run_name: str | None = None

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def load_job(path: str | Path, overrides: list[str] = ()) -> Config | Pipeline:
    """A job file with its overrides: a Config, or a Pipeline when it has `stages:`."""
    path = Path(path)
    data = read_yaml_mapping(path, "job", "sections (task, model, ...)")
    if "stages" not in data:
        apply_overrides(data, overrides)
        return config_from_dict(data, job=path.stem)
    return _pipeline(path, data, list(overrides))


def _pipeline(path: Path, data: dict, overrides: list[str]) -> Pipeline:
    stages = data.pop("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{path}: stages: expected a mapping of stage names to job sections")
    dropped = [key.removeprefix("stages.") for key, _, value in (o.partition("=") for o in overrides)
               if key.startswith("stages.") and key.count(".") == 1 and value in ("null", "")]
    for name in dropped:  # `stages.NAME=null`: the job without that stage (a finished run stands in for it)
        if name not in stages:
            raise ConfigError(f"stages.{name}=null: no stage {name!r}; the stages are {list(stages)}")
        del stages[name]
    overrides = [o for o in overrides if o.partition("=")[0].removeprefix("stages.") not in dropped]
    if not stages:
        raise ConfigError(f"{path}: stages: every stage was dropped")
    for name, body in stages.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise ConfigError(f"{path}: stages: {name!r}: expected a name of letters, digits, '_' or '-'")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: stages.{name}: expected a mapping of sections, got {type(body).__name__}")
    own = {name: [] for name in stages}  # `stages.NAME.key=value`: one stage's overrides
    shared = []
    for item in overrides:
        key = item.partition("=")[0]
        if key.startswith("stages."):
            name, _, rest = key.removeprefix("stages.").partition(".")
            if name not in stages or not rest:
                raise ConfigError(f"{item}: no stage {name!r}; the stages are {list(stages)}")
            own[name].append(item.removeprefix(f"stages.{name}."))
        else:
            shared.append(item)
    names = {"tracking": dict(data.get("tracking") or {})}  # the job's run name, for its stages' names
    apply_overrides(names, [o for o in shared if o.startswith("tracking.run_name=")])
    base_run_name = names["tracking"].get("run_name")

    built, used = {}, set()
    for name, body in stages.items():
        merged = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
        for section, values in body.items():
            if section == "method" or not isinstance(values, dict) or not isinstance(merged.get(section), dict):
                merged[section] = values
            else:
                merged[section] = {**merged[section], **values}
        fields = _method_fields(merged.get("method"))
        mine = []
        for item in shared:  # a method key goes to the stages whose method has it
            key = item.partition("=")[0]
            if key.startswith("method.") and key != "method.name" and fields is not None \
                    and key.removeprefix("method.").split(".")[0] not in fields:
                continue
            mine.append(item)
            used.add(item)
        apply_overrides(merged, [*mine, *own[name]])
        if (merged.get("tracking") or {}).get("run_name") not in (None, base_run_name):
            raise ConfigError(f"{path}: stages.{name}: tracking.run_name is set for the whole job; its stages "
                              f"run as NAME-{name}")
        try:
            built[name] = config_from_dict(merged, job=path.stem)
        except ConfigError as e:
            raise ConfigError(f"{path}: stages.{name}: {e}") from None
    unused = [o for o in shared if o not in used]
    if unused:
        raise ConfigError(f"{unused[0]}: no stage's method has this key")

    needs = {name: {f: ref.run for f, ref in cfg.run_refs().items() if ref.run in stages}
             for name, cfg in built.items()}
    for name, cfg in built.items():
        for f, ref in cfg.run_refs().items():
            if ref.run in stages and ref.step is not None:
                raise ConfigError(f"{path}: stages.{name}: method.{f}: {ref}: a stage's model has no snapshots "
                                  f"to pick from; name the stage alone")
    order = _order(needs, path)
    pipeline = Pipeline(path.stem, path.read_text(encoding="utf-8"),
                        [Stage(n, built[n], needs[n]) for n in order], base_run_name)
    return pipeline


def _method_fields(method) -> set[str] | None:
    from reasonlab.methods import METHODS

    if not isinstance(method, dict):
        return None
    cls = METHODS.get(method.get("name", "cot"))
    return None if cls is None else {f for f in cls.Params.__dataclass_fields__}


def _order(needs: dict[str, dict[str, str]], path: Path) -> list[str]:
    """Stages in dependency order (the file's order where free); a cycle is an error."""
    order, placed = [], set()
    while len(order) < len(needs):
        ready = [n for n in needs if n not in placed and set(needs[n].values()) <= placed]
        if not ready:
            stuck = [n for n in needs if n not in placed]
            cycle = _cycle(stuck, needs)
            raise ConfigError(f"{path}: stages: a cycle: {' → '.join(cycle)} (each reads the next's model)")
        order.append(ready[0])
        placed.add(ready[0])
    return order


def _cycle(stuck: list[str], needs: dict[str, dict[str, str]]) -> list[str]:
    walk = [stuck[0]]
    while True:
        nxt = next(d for d in needs[walk[-1]].values() if d in stuck)
        if nxt in walk:
            return walk[walk.index(nxt):] + [nxt]
        walk.append(nxt)


def check_references(pipeline: Pipeline) -> None:
    """References to runs outside the pipeline exist, are finished and on the same task (ConfigError)."""
    from reasonlab.tracking import lookup_client, resolve_ref

    names = [s.name for s in pipeline.stages]
    for stage in pipeline.stages:
        for f, ref in stage.cfg.run_refs().items():
            if f in stage.needs:
                continue
            what = f"stages.{stage.name}: method.{f}"
            try:
                resolve_ref(lookup_client(stage.cfg, what, ref.run), stage.cfg, ref, what)
            except ConfigError as e:
                if "no run with id or name" in str(e):
                    raise ConfigError(f"{what}: {ref.run!r} is neither a stage of this job ({', '.join(names)}) "
                                      f"nor a run id or name in experiment {stage.cfg.tracking.experiment!r}") from None
                raise


def finished_run(cfg: Config, run_name: str):
    """The FINISHED run of this name in the job's experiment, if there is one."""
    from mlflow.tracking import MlflowClient

    from reasonlab.tracking import RUN_NAME_TAG, tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], max_results=1,
                              filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and attributes.status = 'FINISHED'")
    return runs[0] if runs else None


def train_or_reuse(job: Config | Pipeline, run_name: str, parent_run_id: str | None = None, out=sys.stdout) -> str:
    """The run id of `job` trained as `run_name` (a child of `parent_run_id`): reused when a finished run
    of that name exists, else trained (resuming an unfinished one). For a pipeline, its final stage's run."""
    from reasonlab.train import run_training

    from reasonlab.tracking import FINAL_RUN_TAG

    done = finished_run(job.final.cfg if isinstance(job, Pipeline) else job, run_name)
    if done is not None and isinstance(job, Pipeline):
        print(f"{run_name}: staged job finished already; reusing its last stage's model", file=out, flush=True)
        return done.data.tags[FINAL_RUN_TAG]
    if isinstance(job, Pipeline):
        return run_pipeline(job, run_name, parent_run_id, out=out).final_run_id
    if done is not None:
        print(f"{run_name}: finished already (MLflow run {done.info.run_id}); reusing its model", file=out, flush=True)
        return done.info.run_id
    cfg = job.replace(tracking={"run_name": run_name})
    return run_training(cfg, parent_run_id=parent_run_id, out=out).run_id


@dataclass
class PipelineOutcome:
    run_id: str  # the parent run
    run_name: str
    final_run_id: str  # the last stage's run, whose model is the pipeline's
    tracking_uri: str
    ui_path: str


def run_pipeline(pipeline: Pipeline, run_name: str | None = None, parent_run_id: str | None = None,
                 out=sys.stdout) -> PipelineOutcome:
    """Every stage in order as a child run of one parent run; finished stages of a restarted pipeline
    (same run name) are skipped. The parent ends FINISHED, FAILED or KILLED with its stages."""
    from reasonlab import stopping
    from reasonlab.tracking import FINAL_RUN_TAG, DriverRun
    from reasonlab.train import run_training

    check_references(pipeline)
    name = run_name or pipeline.run_name or f"{pipeline.job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    final_cfg = pipeline.final.cfg
    if parent_run_id is None:
        stopping.run_names.append(name)
    parent = DriverRun(final_cfg, name, parent_run_id=parent_run_id)
    if not parent.resumed:
        parent.client.set_tag(parent.run_id, STAGES_TAG, ",".join(s.name for s in pipeline.stages))
        parent.client.log_text(parent.run_id, pipeline.text, "job.yaml")
    print(f"{'resuming' if parent.resumed else 'starting'} staged job {name} (MLflow parent run {parent.run_id}): "
          f"{' → '.join(s.name for s in pipeline.stages)}; restart with tracking.run_name={name} to resume it",
          file=out, flush=True)
    with parent.closing():
        done: dict[str, str] = {}
        for i, stage in enumerate(pipeline.stages, 1):
            stage_name = f"{name}-{stage.name}"
            finished = finished_run(stage.cfg, stage_name)
            if finished is not None:
                print(f"stage {i}/{len(pipeline.stages)} {stage.name}: finished already (MLflow run "
                      f"{finished.info.run_id}); skipped", file=out, flush=True)
                done[stage.name] = finished.info.run_id
                continue
            cfg = stage.cfg.replace(method={f: done[s] for f, s in stage.needs.items()},
                                    tracking={"run_name": stage_name})
            print(f"stage {i}/{len(pipeline.stages)} {stage.name}: {cfg.method.name}"
                  + "".join(f", {f} from stage {s}" for f, s in stage.needs.items()), file=out, flush=True)
            done[stage.name] = run_training(cfg, parent_run_id=parent.run_id, out=out).run_id
        final = done[pipeline.final.name]
        parent.client.set_tag(parent.run_id, FINAL_RUN_TAG, final)
        metrics = parent.client.get_run(final).data.metrics
        parent.log_metrics({k: v for k, v in metrics.items() if k.startswith(("test/", "eval/"))})
    return PipelineOutcome(parent.run_id, name, final, parent.uri, parent.ui_url)
