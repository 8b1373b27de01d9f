"""The MLflow run lifecycle: the driver creates (or finds) the run and sets its final status; rank 0
of the workers logs into it by id.

Defaults need no server: a SQLite store and an artifact folder under $REASONLAB_HOME (~/.reasonlab).
`tracking.uri` or $MLFLOW_TRACKING_URI switch to a real server. Ray workers do not inherit the
tracking URI, so it travels with the run id.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from reasonlab import stopping
from reasonlab.errors import ConfigError
from reasonlab.runref import RunRef

if TYPE_CHECKING:  # not imported: `reasonlab ui` reads this module and should not pay for torch
    from reasonlab.config import Config

RUN_NAME_TAG = "reasonlab.run_name"
FINAL_RUN_TAG = "reasonlab.final_run"  # on a staged job's parent run: the run of its last stage
MAX_PARAM_LENGTH = 6000
# the parameters a run's model has, counted when it is built (`model.n_params` is the size a job asks for, or None)
PARAM_COUNT = "param_count"
PARAM_COUNT_USED = "param_count_used"  # without the embedding rows of tokens the task never uses
# the name of a run's MLflow logged model: not "model", the run's own folder, or MLflow would lay the logged
# model's files over that folder whenever it is listed or downloaded (and, in mlflow 3.17, look the model up in
# the default store, failing unless MLFLOW_TRACKING_URI names this one)
LOGGED_MODEL = "final_model"
# MLflow 3's marker of what an experiment holds (its UI's "Model training" rather than "GenAI")
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# a saved view of the runs table that MLflow's UI opens with ?viewStateShareKey=reasonlab: its columns
RUNS_VIEW = "reasonlab"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"
RUNS_VIEW_COLUMNS = ["attributes.`Models`", "params.`method.name`", "params.`model.arch`", "params.`model.n_layer`",
                     "params.`model.d_model`", f"params.`{PARAM_COUNT}`", "metrics.`test/accuracy`",
                     "metrics.`eval/accuracy`", "metrics.`train/loss`", "metrics.`train/tokens_per_sec`"]


def home() -> Path:
    return Path(os.environ.get("REASONLAB_HOME") or Path.home() / ".reasonlab").expanduser().resolve()


def tracking_uri(cfg: Config | None = None) -> str:
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def storage_path(cfg: Config) -> str:
    return cfg.tracking.storage_path or str(home() / "ray_results")


def local_artifact_root(uri: str) -> str | None:
    """For a SQLite store without a server: the artifact folder beside the database file.

    MLflow's default would be ./mlruns of whichever process created the experiment.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


@contextlib.contextmanager
def _local_store_lock(uri: str):
    """Held while a driver opens a local store: of two drivers started at once on a new one, one creates it
    (MLflow's schema migrations) and the experiment while the other waits; the other's migration failed."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(name, artifact_location=local_artifact_root(uri))
        mark_model_training(client, experiment_id, {})
        return experiment_id
    mark_model_training(client, experiment.experiment_id, experiment.tags)
    return experiment.experiment_id


def mark_model_training(client: MlflowClient, experiment_id: str, tags: dict) -> None:
    """Tag an experiment (unless `tags`, its tags, already say so) as MLflow's UI needs to show it as model
    training: the experiment kind, and the runs-table view `ui_address` opens (metric and size columns)."""
    wanted = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND,
              RUNS_VIEW_TAG: json.dumps({"selectedColumns": RUNS_VIEW_COLUMNS})}
    for key, value in wanted.items():
        if tags.get(key) != value:
            client.set_experiment_tag(experiment_id, key, value)


def ui_address(experiment_id: str, run_id: str | None = None) -> str:
    """The UI's address (after http://host:port/) of an experiment's runs table, or of one run, in MLflow 3's
    "Model training" workflow. MLflow 3.17's UI picks the workflow from the address or the browser's last
    choice, not from the experiment's kind tag, so the address names it."""
    if run_id:
        return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW}&workflowType=machine_learning"


def ui_experiments(uri: str) -> list[tuple[str, str]]:
    """(name, UI address) of each experiment holding reasonlab runs in the local store `uri` (a SQLite file),
    read straight from the file: `reasonlab ui` asks before the server starts, and an MlflowClient would cost
    seconds of CPU there. An experiment whose runs all predate the runs-table view opens without it. None if
    the store does not exist yet or cannot be read."""
    path = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or not path.is_file():
        return []
    has_tag = "SELECT 1 FROM experiment_tags t WHERE t.experiment_id = e.experiment_id AND t.key = ?"
    query = (f"SELECT e.experiment_id, e.name, EXISTS({has_tag}) FROM experiments e "
             f"WHERE e.lifecycle_stage = 'active' AND (EXISTS({has_tag} AND t.value = ?) OR EXISTS("
             "SELECT 1 FROM runs r JOIN tags g ON g.run_uuid = r.run_uuid WHERE r.experiment_id = e.experiment_id "
             "AND g.key = ?)) ORDER BY e.experiment_id")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            rows = db.execute(query, (RUNS_VIEW_TAG, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, RUN_NAME_TAG)).fetchall()
    except sqlite3.Error:
        return []
    return [(name, ui_address(str(experiment_id)) if has_view else
             f"#/experiments/{experiment_id}/runs?workflowType=machine_learning")
            for experiment_id, name, has_view in rows]


def logged_param_count(params: dict, used: bool = False) -> int | None:
    """A run's counted parameters (PARAM_COUNT, or PARAM_COUNT_USED); runs logged before these names had
    n_params and n_params_used."""
    value = params.get(PARAM_COUNT_USED if used else PARAM_COUNT, params.get("n_params_used" if used else "n_params"))
    return None if value is None else int(value)


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """The runs nested under a parent run (a sweep's trials)."""
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def find_run(client: MlflowClient, experiment: str, ref: str, what: str):
    """A run by id, or by reasonlab run name in `experiment`; `what` names the reference in errors."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass  # not a run id: a run name, then
    try:
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{ref}'", max_results=1)
    except MlflowException as e:
        raise ConfigError(f"{what}: cannot look up run {ref!r} at {client.tracking_uri}: {e.message}") from None
    if not runs:
        raise ConfigError(f"{what}: no run with id or name {ref!r} in experiment {experiment!r} "
                          f"at {client.tracking_uri}")
    return runs[0]


def lookup_client(cfg: Config | None, what: str, ref: str) -> MlflowClient:
    """A client of the job's tracking store for looking runs up; a local store that does not exist yet
    holds no runs (and is not created by looking)."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"{what}: no run with id or name {ref!r}: there are no runs at {uri} yet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own lines say what happens
    return MlflowClient(uri)


def snapshot_path(step: int) -> str:
    """Where a run keeps the model saved at `step` (beside `model/`, the final one)."""
    return f"snapshots/step_{step:08d}"


def resolve_ref(client: MlflowClient, cfg: Config, ref: RunRef, what: str, sections: tuple[str, ...] = ("task.",),
                ignore: tuple[str, ...] | set[str] = ()):
    """The finished run `ref` names, checked before anything starts: it exists in the job's experiment,
    FINISHED, with a saved model (or the snapshot at `ref.step`), trained on the same task (params under
    `sections` equal). A staged job's parent run stands for its last stage."""
    run = finished_model_run(client, cfg.tracking.experiment, ref, what)
    check_same_params(run, ref.run, cfg, sections, what, ignore)
    return run


def finished_model_run(client: MlflowClient, experiment: str, ref: RunRef, what: str):
    """The run `ref` names (by id, or by name in `experiment`), FINISHED, with a saved model (or the
    snapshot at `ref.step`); a staged job's parent run stands for its last stage."""
    run = find_run(client, experiment, ref.run, what)
    final = run.data.tags.get(FINAL_RUN_TAG)
    if final and run.info.status == "FINISHED":
        run = client.get_run(final)
    if run.info.status != "FINISHED":
        raise ConfigError(f"{what}: run {ref.run!r} is {run.info.status}, not FINISHED; only a finished run's "
                          f"model can be used")
    folder = "model" if ref.step is None else snapshot_path(ref.step)
    under = folder.rpartition("/")[0] or None
    if not any(a.path == folder for a in client.list_artifacts(run.info.run_id, under)):
        if ref.step is None:
            raise ConfigError(f"{what}: run {ref.run!r} has no saved model")
        steps = [int(a.path.rpartition("_")[2]) for a in client.list_artifacts(run.info.run_id, "snapshots")]
        raise ConfigError(f"{what}: run {ref.run!r} has no snapshot at step {ref.step}; its snapshots: "
                          f"{', '.join(map(str, sorted(steps))) or 'none (train.snapshot_steps saves them)'}")
    return run


def check_same_params(run, ref: str, cfg: Config, sections: tuple[str, ...], what: str,
                      ignore: tuple[str, ...] | set[str] = ()) -> None:
    """The run was trained with this job's values under `sections` (e.g. the same task)."""
    for key, value in cfg.flat().items():
        if key.startswith(sections) and key not in ignore and key in run.data.params \
                and run.data.params[key] != str(value)[:MAX_PARAM_LENGTH]:
            raise ConfigError(f"{what}: run {ref!r} was trained with {key}={run.data.params[key]}, "
                              f"this job has {value}")


def download_run(client: MlflowClient, run_id: str, step: int | None, directory: str) -> str:
    """A run's `config.yaml` and its model (final, or the snapshot at `step`) as `model/` in
    `directory`, the layout runs.load_run_dir reads."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client.download_artifacts(run_id, "config.yaml", directory)
    if step is None:
        client.download_artifacts(run_id, "model", directory)
    else:
        path = client.download_artifacts(run_id, snapshot_path(step), directory)
        os.rename(path, os.path.join(directory, "model"))
    return directory


class DriverRun:
    """The MLflow run of one training run, owned by the driver."""

    def __init__(self, cfg: Config, run_name: str, parent_run_id: str | None = None) -> None:
        self.uri = tracking_uri(cfg)
        with _local_store_lock(self.uri):
            self.client = MlflowClient(self.uri)
            self.experiment_id = _experiment_id(self.client, cfg.tracking.experiment, self.uri)
        self.run_name = run_name
        existing = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
        )
        self.resumed = bool(existing)
        if existing:
            run = existing[0]
            if run.info.status == "FINISHED":
                raise ConfigError(f"tracking.run_name: run {run_name!r} already finished "
                                  f"(MLflow run {run.info.run_id}); choose another name")
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_NAME_TAG: run_name, "reasonlab.job": cfg.job}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self._stop = stopping.on_stop(lambda: self.end("KILLED"))  # closed first if SIGTERM comes
        if not existing:
            try:
                self.log_params(cfg.flat())
                self.client.log_text(self.run_id, cfg.to_yaml(), "config.yaml")
            except BaseException as e:  # Ctrl-C while the run is being made: no run is left RUNNING
                self.end("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
                raise

    def log_params(self, params: dict) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i: i + 100])

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    @contextlib.contextmanager
    def closing(self):
        """The run ends FINISHED when the block completes, KILLED on Ctrl-C or exit (re-raised as
        KeyboardInterrupt), FAILED on any other exception: never left RUNNING."""
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise KeyboardInterrupt from None
        finally:
            self.end(status)

    def end(self, status: str) -> None:
        stopping.done(self._stop)
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.from_string(status)))

    @property
    def ui_url(self) -> str:
        return ui_address(self.experiment_id, self.run_id)


class RunLogger:
    """What rank 0 uses inside a Ray worker: metrics and artifacts into an existing run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: dict) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_logged_model(self, model, tokenizer, folder: str, step: int) -> str:
        """The run's final model as an MLflow logged model (the experiment's Models tab; registrable), besides
        the run's own `model/` folder: in the transformers flavour (weights in its `model/` folder, loadable with
        `from_pretrained`; the tokenizer in `components/tokenizer`) when transformers knows the model as a causal
        LM, else `folder` (the model as its method saved it) as it is. The run's metrics at `step` are the
        model's. Returns the model's id."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        run = self.client.get_run(self.run_id)
        if type(model).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            from mlflow.entities import LoggedModelOutput

            logged = self.client.create_logged_model(run.info.experiment_id, LOGGED_MODEL, self.run_id,
                                                     params=run.data.params)
            self.client.log_model_artifacts(logged.model_id, folder)
            self.client.finalize_logged_model(logged.model_id, "READY")
            self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step)])
            return logged.model_id
        import mlflow.transformers
        import torch
        import transformers

        # mlflow's log_model reads the store and the experiment from the environment (there is no active run
        # in a worker); say them for this call only
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
        os.environ.update(MLFLOW_TRACKING_URI=self.client.tracking_uri, MLFLOW_EXPERIMENT_ID=run.info.experiment_id)
        flavor_log = logging.getLogger("mlflow.transformers")
        level = flavor_log.level
        flavor_log.setLevel(logging.ERROR)  # its warnings that a local model has no hub model card or licence
        try:
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer}, name=LOGGED_MODEL, task="text-generation", run_id=self.run_id,
                step=step, pip_requirements=[f"transformers=={transformers.__version__}",  # no inference: it
                                             f"torch=={torch.__version__.split('+')[0]}"])  # loads the model again
        finally:
            flavor_log.setLevel(level)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return info.model_id

    def metric_history(self) -> dict[str, list[tuple[int, float]]]:
        """Every metric of the run as (step, value) pairs, from the store: a resumed run's whole course."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {k: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, k)] for k in keys}
