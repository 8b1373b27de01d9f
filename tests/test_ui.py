"""What the MLflow UI shows of reasonlab runs, without Ray: experiments marked as model training with a runs-table
view of metric columns, the parameter counts named apart from `model.n_params`, the final model as a logged model
that can be registered, and `reasonlab ui` as one light server process. (benchmarks/ui_check.py looks at the same
in a real browser.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import BIN, REPO, _free_port
from reasonlab import cli
from reasonlab.config import load_config
from reasonlab.methods import make_method
from reasonlab.tasks import make_task
from reasonlab.tokenizer import build_tokenizer
from reasonlab.tracking import (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, PARAM_COUNT, PARAM_COUNT_USED, RUNS_VIEW_TAG,
                                DriverRun, RunLogger, logged_param_count, ui_experiments)
from reasonlab.train import log_model, size_params

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("REASONLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def _tiny_run(name: str):
    cfg = load_config(REPO / "jobs" / "quickstart.yaml", [*TINY, f"tracking.run_name={name}"])
    task, method = make_task(cfg.task), make_method(cfg.method, cfg)
    tokenizer = build_tokenizer(task)
    method.setup(task, tokenizer)
    model = method.build_model(cfg.model, tokenizer, 64, torch.device("cpu"))
    return cfg, method, tokenizer, model, DriverRun(cfg, name)


def test_experiments_are_marked_as_model_training_with_a_runs_view(home):
    cfg, method, tokenizer, model, run = _tiny_run("marked")
    experiment = run.client.get_experiment(run.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    columns = json.loads(experiment.tags[RUNS_VIEW_TAG])["selectedColumns"]
    assert {"metrics.`test/accuracy`", "metrics.`eval/accuracy`", "metrics.`train/loss`",
            f"params.`{PARAM_COUNT}`", "attributes.`Models`"} <= set(columns)
    [(name, address)] = ui_experiments(run.uri)
    assert name == cfg.tracking.experiment
    assert address == (f"#/experiments/{run.experiment_id}/runs?viewStateShareKey=reasonlab"
                       "&workflowType=machine_learning")
    assert run.ui_url.endswith(f"/runs/{run.run_id}?workflowType=machine_learning")

    # an experiment from before the marking opens on its runs too, without the view it lacks; the next run marks it
    client = MlflowClient(run.uri)
    old = client.create_experiment("old")
    client.create_run(old, tags={"reasonlab.run_name": "old-run"})
    client.create_experiment("not-ours")
    assert dict(ui_experiments(run.uri))["old"] == f"#/experiments/{old}/runs?workflowType=machine_learning"
    assert "not-ours" not in dict(ui_experiments(run.uri))
    DriverRun(load_config(REPO / "jobs" / "quickstart.yaml", ["tracking.experiment=old"]), "old-run-2")
    assert "viewStateShareKey" in dict(ui_experiments(run.uri))["old"]
    assert ui_experiments(f"sqlite:///{home / 'nothing.db'}") == []


def test_parameter_counts_are_named_apart_from_the_requested_size(home):
    _, _, tokenizer, model, run = _tiny_run("sizes")
    sizes = size_params(model, [0, 1, 2])
    assert set(sizes) == {PARAM_COUNT, PARAM_COUNT_USED} and sizes[PARAM_COUNT] > sizes[PARAM_COUNT_USED] > 0
    assert not {"n_params", "n_params_used"} & set(sizes)
    RunLogger(run.uri, run.run_id).log_params(sizes)
    params = run.client.get_run(run.run_id).data.params
    assert params["model.n_params"] == "None" and logged_param_count(params) == sizes[PARAM_COUNT]
    assert logged_param_count(params, used=True) == sizes[PARAM_COUNT_USED]
    assert logged_param_count({"n_params": "7", "n_params_used": "5"}) == 7  # runs logged before the rename
    assert logged_param_count({"n_params": "7", "n_params_used": "5"}, used=True) == 5
    assert logged_param_count({}) is None


def test_final_model_is_a_registrable_logged_model_and_still_a_from_pretrained_folder(home, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, method, tokenizer, model, run = _tiny_run("final")
    logger = RunLogger(run.uri, run.run_id)
    logger.log_metrics({"test/accuracy": 0.25}, 40)
    log_model(model, tokenizer, method, logger, "model", logged_model_step=40)
    log_model(model, tokenizer, method, logger, "snapshots/step_00000020")  # a snapshot: a folder only
    client = run.client
    # the run's own folder, as every reader of a run loads it
    folder = Path(client.download_artifacts(run.run_id, "model", str(tmp_path / "run")))
    assert AutoModelForCausalLM.from_pretrained(folder).config.n_layer == 1
    assert not (folder / "MLmodel").exists()  # the logged model's files are not laid over the run's folder
    assert {f.path for f in client.list_artifacts(run.run_id, "model")} == {f"model/{p.name}" for p in folder.iterdir()}
    assert len(AutoTokenizer.from_pretrained(folder)) == len(tokenizer)
    # and one logged model, of this run, in the transformers flavour, with the run's final metrics
    [output] = client.get_run(run.run_id).outputs.model_outputs
    assert output.step == 40
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "final_model"
    assert (logged.experiment_id, logged.source_run_id, str(logged.status)) == (run.experiment_id, run.run_id,
                                                                                "READY")
    assert {m.key: m.value for m in logged.metrics} == {"test/accuracy": 0.25}
    assert logged.params["model.n_layer"] == "1"
    local = Path(logged.artifact_location.removeprefix("file://"))
    assert "transformers" in yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    weights = AutoModelForCausalLM.from_pretrained(local / "model")
    assert torch.equal(weights.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])
    assert len(AutoTokenizer.from_pretrained(local / "components" / "tokenizer")) == len(tokenizer)
    # it can be registered (what the UI's "Register model" does)
    import mlflow

    mlflow.set_tracking_uri(run.uri)
    try:
        version = mlflow.register_model(f"models:/{logged.model_id}", "tiny-multiplier")
    finally:
        mlflow.set_tracking_uri(None)
    assert int(version.version) == 1 and version.source == f"models:/{logged.model_id}" and version.status == "READY"
    assert os.environ.get("MLFLOW_EXPERIMENT_ID") is None and os.environ.get("MLFLOW_TRACKING_URI") is None


def test_a_model_transformers_cannot_pipeline_is_logged_as_its_folder(home, tmp_path):
    _, _, _, _, run = _tiny_run("other")
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 16)
    model_id = RunLogger(run.uri, run.run_id).log_logged_model(torch.nn.Linear(2, 2), None, str(folder), 7)
    logged = run.client.get_logged_model(model_id)
    assert str(logged.status) == "READY" and logged.source_run_id == run.run_id
    assert (Path(logged.artifact_location.removeprefix("file://")) / "weights.bin").read_bytes() == b"\0" * 16
    assert [o.step for o in run.client.get_run(run.run_id).outputs.model_outputs] == [7]


def test_ui_command_is_one_server_process_without_job_consumers(home, monkeypatch, capsys):
    _, _, _, _, run = _tiny_run("shown")
    seen = {}
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: seen.update(argv=argv, env=env))
    cli.main(["ui", "--port", "5123"])
    argv, out = seen["argv"], capsys.readouterr().out
    assert argv[1:4] == ["-m", "mlflow", "server"] and argv[argv.index("--workers") + 1] == "1"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5123"
    assert seen["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert (f"experiment reasonlab: http://127.0.0.1:5123/#/experiments/{run.experiment_id}/runs?"
            "viewStateShareKey=reasonlab&workflowType=machine_learning") in out
    assert cli.main(["ui", "--port", "70000"]) == 2 and capsys.readouterr().err.count("\n") == 1


def _group(pgid: int) -> list[str]:
    names = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                names.append(Path(f"/proc/{entry}/cmdline").read_text().replace("\0", " "))
        except (OSError, ValueError):
            pass
    return names


def test_ui_server_answers_with_one_worker_and_no_job_consumers(home, tmp_path):
    _, _, _, _, run = _tiny_run("served")
    port = _free_port()
    with open(tmp_path / "ui.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "reasonlab"), "ui", "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get?"
                                            f"experiment_id={run.experiment_id}", timeout=5) as r:
                    experiment = json.load(r)["experiment"]
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "ui.log").read_text()[-2000:]
                time.sleep(0.5)
        tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND and RUNS_VIEW_TAG in tags
        processes = _group(proc.pid)
        assert len(processes) <= 2 and not any("huey" in p for p in processes), processes  # mlflow + uvicorn
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _open_run_at_the_barrier(barrier, name: str) -> None:
    barrier.wait()
    DriverRun(load_config(REPO / "jobs" / "quickstart.yaml", [f"tracking.run_name={name}"]), name)


def test_drivers_started_at_once_on_a_new_store_each_get_their_run(home):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_open_run_at_the_barrier, args=(barrier, f"at-once-{i}")) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]  # MLflow's schema migration raced and failed in all but one
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    [experiment] = client.search_experiments(filter_string="name = 'reasonlab'")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    assert names == {"at-once-0", "at-once-1", "at-once-2"}
