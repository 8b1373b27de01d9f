"""End to end on the session's local Ray instance: train, track, resume after a kill, ray job submit."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, REPO, _free_port, cli_in_fresh_python, reasonlab
from reasonlab.data import latest_checkpoint_step

pytestmark = pytest.mark.ray

TINY = ["task.a_digits=2", "task.b_digits=2", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
        "train.batch_size=16", "train.warmup_steps=2", "train.log_every=5", "eval.num_examples=20",
        "eval.test_examples=20", "eval.batch_size=20"]


def _client(home: Path, uri: str | None = None) -> MlflowClient:
    return MlflowClient(uri or f"sqlite:///{home / 'mlflow.db'}")


def _run(home: Path, name: str, uri: str | None = None):
    client = _client(home, uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`reasonlab.run_name` = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return runs[0]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def kill_after_first_checkpoint(args: list[str], name: str, home: Path) -> int:
    """Start `reasonlab ARGS`, SIGKILL its process group once Ray has registered a checkpoint of run
    `name`; returns the step of the checkpoint a restart will resume from."""
    proc = subprocess.Popen([str(BIN / "reasonlab"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    storage = str(home / "ray_results")
    deadline = time.time() + 300
    try:
        while not latest_checkpoint_step(storage, name):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return latest_checkpoint_step(storage, name)


def test_training_run_is_tracked_end_to_end(ray_head, reasonlab_home, tmp_path):
    """Two workers (one worker's runs are every other test's), a store named by MLFLOW_TRACKING_URI."""
    workers = 2
    name = f"e2e-{workers}"
    env = dict(os.environ)
    # MLFLOW_TRACKING_URI must reach the workers, which log the metrics
    uri = env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'elsewhere' / 'runs.db'}"
    (tmp_path / "elsewhere").mkdir()
    accumulate = ["train.grad_accum=2"]  # 2 workers x 2 micro-batches of 4
    result = reasonlab("train", "jobs/quickstart.yaml", *TINY, "train.max_steps=20", "train.eval_every=10",
                       f"scaling.num_workers={workers}", f"tracking.run_name={name}", *accumulate, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "step 20/20" in out and "eval at step 10" in out and "test: accuracy" in out
    run = _run(reasonlab_home, name, uri)
    assert f"MLflow run id {run.info.run_id}" in result.stdout
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["task.name"] == "multiplication" and params["train.max_steps"] == "20"
    assert params["scaling.num_workers"] == str(workers)
    assert int(params["param_count"]) >= int(params["param_count_used"]) > 0 and params["model.n_params"] == "None"
    client = _client(reasonlab_home, uri)
    steps = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)]
             for k in ("train/loss", "train/lr", "train/tokens_per_sec", "eval/accuracy", "eval/examples_per_sec")}
    assert steps["train/loss"] == [5, 10, 15, 20] and steps["train/tokens_per_sec"] == [5, 10, 15, 20]
    assert steps["eval/accuracy"] == [10, 20] and steps["eval/examples_per_sec"] == [10, 20]
    assert 0 <= run.data.metrics["test/accuracy"] <= 1

    files = _artifacts(client, run.info.run_id)
    assert {"config.yaml", "predictions.jsonl", "tokenizer/tokenizer.json", "model/config.json",
            "model/model.safetensors", "model/tokenizer.json"} <= files
    assert run.info.artifact_uri.startswith((tmp_path / "elsewhere" / "mlartifacts").as_uri())
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    import yaml
    assert yaml.safe_load((local / "config.yaml").read_text())["scaling"]["num_workers"] == workers
    predictions = [json.loads(line) for line in (local / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 20 and {"prompt", "answer", "predicted", "correct"} <= set(predictions[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(local / "model")
    tokenizer = AutoTokenizer.from_pretrained(local / "tokenizer")
    assert model.config.n_layer == 1 and model.config.vocab_size == len(tokenizer)
    # the final model is also an MLflow logged model of the run (transformers flavour), from the worker
    [output] = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and str(logged.status) == "READY"
    from mlflow.artifacts import download_artifacts
    mlmodel = download_artifacts(artifact_uri=f"{logged.artifact_location}/MLmodel", dst_path=str(tmp_path / "lm"))
    assert "transformers" in yaml.safe_load(Path(mlmodel).read_text())["flavors"]


def test_killed_run_resumes_from_its_last_checkpoint(ray_head, reasonlab_home):
    name = "killed"
    args = [*TINY, "train.max_steps=160", "train.eval_every=20", f"tracking.run_name={name}"]
    registered = kill_after_first_checkpoint(["train", "jobs/quickstart.yaml", *args], name, reasonlab_home)
    killed = _run(reasonlab_home, name)
    assert killed.info.status == "RUNNING"  # nobody could close it: the driver was killed
    assert 0 < registered < 160

    result = reasonlab("train", "jobs/quickstart.yaml", *args)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert f"resuming run {name}" in out
    resumed_at = int(out.split("resumed from the checkpoint at step ")[1].split(";")[0])
    first_index = int(out.split("first example index ")[1].split()[0])
    assert resumed_at == registered
    assert first_index == resumed_at * 16  # the data stream continues where the checkpoint left it
    run = _run(reasonlab_home, name)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    loss_steps = [m.step for m in _client(reasonlab_home).get_metric_history(run.info.run_id, "train/loss")]
    assert max(loss_steps) == 160 and any(s > resumed_at for s in loss_steps)
    assert f"step {resumed_at + 5}/160" in out and f"step {resumed_at}/160" not in out  # no step done twice


def test_two_runs_at_once_on_the_two_cpu_head_both_train_to_the_end(ray_head, reasonlab_home):
    # the second run's workers leave Ray Data no CPU, and Ray's AutoscalingCoordinator leaves it a budget of 0:
    # its generators, which reserve no CPU, must stream all the same (they needed one, and it waited for good)
    args = [*TINY, "scaling.torch_threads=1", "train.max_steps=300", "train.eval_every=300", "train.log_every=100"]
    procs = [subprocess.Popen([str(BIN / "reasonlab"), "train", "jobs/quickstart.yaml", *args,
                               f"tracking.run_name=together-{i}"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "no training batch" not in out, out[-3000:]
        assert "step 300/300" in out
    assert {_run(reasonlab_home, f"together-{i}").info.status for i in range(2)} == {"FINISHED"}


def _read_until(proc: subprocess.Popen, text: str, timeout: float = 300) -> str:
    deadline, output = time.time() + timeout, ""
    for line in proc.stdout:
        output += line
        if text in line:
            return output
        assert time.time() < deadline, output[-2000:]
    raise AssertionError(f"{text!r} never came: {output[-2000:]}")


@pytest.mark.parametrize("sig, when", [(signal.SIGINT, "training"), (signal.SIGTERM, "training"),
                                       (signal.SIGINT, "starting"), (signal.SIGTERM, "starting")])
def test_a_stopped_run_is_closed_as_killed_and_the_driver_exits_with_one_line(ray_head, reasonlab_home, sig, when):
    """Ctrl-C in the terminal (SIGINT to the foreground process group) and SIGTERM (`kill`, `timeout`, `ray job
    stop`), while training or while the run starts: the run ends KILLED and the driver exits within a minute,
    saying so, with no abort. Each signal is sent twice, once in each phase."""
    name = f"stopped-{sig.name}-{when}"
    # SIGINT as a terminal leaves it, even when this suite runs in the background; but SIGTERM while starting is
    # sent with SIGINT ignored, as `nohup reasonlab ... &` from a script leaves it: SIGTERM must work either way
    ignore_sigint = sig == signal.SIGTERM and when == "starting"
    args = ["train", "jobs/quickstart.yaml", *TINY, "train.max_steps=2000", f"tracking.run_name={name}"]
    proc = subprocess.Popen([str(BIN / "reasonlab"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint
                                                             else signal.SIG_DFL))
    output = _read_until(proc, "step 20/2000" if when == "training" else f"starting run {name}")  # run exists / trains
    (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)  # SIGTERM to the driver alone, as `kill` does
    stopped = time.time()
    rest, _ = proc.communicate(timeout=120)
    assert time.time() - stopped < 60, f"took {time.time() - stopped:.0f} s to exit"
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), (output + rest)[-3000:]
    resume = shlex.join(["reasonlab", *args])  # the same command, the run named
    assert rest.rstrip().splitlines()[-1] == ("reasonlab: interrupted; its runs are closed as KILLED"
                                              if sig == signal.SIGINT else
                                              "reasonlab: stopped by SIGTERM; its runs are closed as KILLED"
                                              ) + f"; resume with: {resume}"
    assert "Fatal Python error" not in rest and "core dumped" not in rest
    assert _run(reasonlab_home, name).info.status == "KILLED"


def test_finished_run_name_is_not_reused(ray_head, reasonlab_home):
    name = "killed"  # finished by test_killed_run_resumes_from_its_last_checkpoint
    if _run(reasonlab_home, name).info.status != "FINISHED":
        pytest.skip("needs the finished run of the resume test")
    result = cli_in_fresh_python("train", "jobs/quickstart.yaml", *TINY, f"tracking.run_name={name}")
    assert result.returncode == 2 and "already finished" in result.stderr


def test_failed_run_is_closed_as_failed(ray_head, reasonlab_home, tmp_path):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "gpt2", "n_layer": "not a number"}')
    name = "fails"
    result = reasonlab("train", "jobs/quickstart.yaml", *TINY, "train.max_steps=5", f"model.pretrained={broken}",
                       f"tracking.run_name={name}")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"run {name} failed" in result.stderr and "marked FAILED" in result.stderr
    assert _run(reasonlab_home, name).info.status == "FAILED"


def test_ray_job_submit_reaches_succeeded(ray_head, reasonlab_home):
    name = "submitted"
    env_vars = json.dumps({"env_vars": {"REASONLAB_HOME": str(reasonlab_home)}})
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".",
         "--runtime-env-json", env_vars, "--", "reasonlab", "train", "jobs/quickstart.yaml", *TINY,
         "train.max_steps=10", "train.eval_every=10", f"tracking.run_name={name}"],
        cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "succeeded" in out.lower()
    job_id = out.split("Job '")[1].split("'")[0]
    from ray.job_submission import JobStatus, JobSubmissionClient
    assert JobSubmissionClient(ray_head["dashboard"]).get_job_status(job_id) == JobStatus.SUCCEEDED
    assert _run(reasonlab_home, name).info.status == "FINISHED"


def test_ui_serves_the_runs(ray_head, reasonlab_home, tmp_path, monkeypatch):
    """`reasonlab ui` is the MLflow UI on loopback over the default store, artifacts included."""
    name = "killed"  # finished by test_killed_run_resumes_from_its_last_checkpoint, in the default store
    expected = _run(reasonlab_home, name)
    port = _free_port()
    # the server's output goes to a file: its job consumers outlive it and would hold a pipe open forever
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "reasonlab"), "ui", "--port", str(port)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        client = MlflowClient(f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # poll once a second, not with backoff
        deadline = time.time() + 120
        while True:
            try:
                experiments = client.search_experiments()
                break
            except Exception:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(1)
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        runs = client.search_runs([e.experiment_id for e in experiments],
                                  filter_string=f"tags.`reasonlab.run_name` = '{name}'")
        assert [r.info.run_id for r in runs] == [expected.info.run_id]
        assert runs[0].data.metrics["test/accuracy"] == expected.data.metrics["test/accuracy"]
        assert {"config.yaml", "model", "tokenizer", "predictions.jsonl"} <= {
            f.path for f in client.list_artifacts(expected.info.run_id)}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and every process it started
        proc.wait(timeout=30)


def test_a_worker_dying_past_max_failures_closes_the_run_as_failed(ray_head, reasonlab_home):
    """A training worker's process killed (an OOM kill, a lost node) with no retries left: Train gives up, the run
    ends FAILED and the driver exits 1 saying so."""
    name = "worker-died"
    proc = subprocess.Popen([str(BIN / "reasonlab"), "train", "jobs/quickstart.yaml", *TINY, "train.max_steps=2000",
                             "scaling.max_failures=0", f"tracking.run_name={name}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = _read_until(proc, "step 20/2000")
        workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                   and (p / "cmdline").exists() and (p / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker")]
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, (output + rest)[-3000:]
    assert f"reasonlab: run {name} failed (MLflow run " in rest and "marked FAILED" in rest, rest[-3000:]
    assert _run(reasonlab_home, name).info.status == "FAILED"


def test_ray_job_stop_closes_the_submitted_run_as_killed(ray_head, reasonlab_home):
    """`ray job stop` sends the driver SIGTERM, then SIGKILL 3 s later: the run is closed first, so it ends KILLED
    whatever the rest of the stop had time for, and the job ends STOPPED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    name = "job-stopped"
    env_vars = json.dumps({"env_vars": {"REASONLAB_HOME": str(reasonlab_home)}})
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--no-wait", "--working-dir", ".",
         "--runtime-env-json", env_vars, "--", "reasonlab", "train", "jobs/quickstart.yaml", *TINY,
         "train.max_steps=2000", f"tracking.run_name={name}"],
        cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=120)
    out = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, out[-3000:]
    job_id = out.split("Job '")[1].split("'")[0]
    client = JobSubmissionClient(ray_head["dashboard"])
    deadline = time.time() + 300
    try:
        while "step 20/2000" not in client.get_job_logs(job_id):
            assert client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING), \
                client.get_job_logs(job_id)[-3000:]
            assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
            time.sleep(1)
        stopped = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_head["dashboard"], job_id],
                                 cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
        while client.get_job_status(job_id) == JobStatus.RUNNING:
            assert time.time() < deadline + 60
            time.sleep(1)
    finally:  # never left running into the next test
        client.stop_job(job_id)
    assert client.get_job_status(job_id) == JobStatus.STOPPED
    assert _run(reasonlab_home, name).info.status == "KILLED"
