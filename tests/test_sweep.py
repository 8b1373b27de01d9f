"""Sweeps: bad files fail before Ray; a grid runs as Tune trials, each a child MLflow run of one parent."""
from __future__ import annotations

import csv
import io

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, cli_in_fresh_python, reasonlab


@pytest.mark.parametrize("text, message", [
    ("base: ../jobs/quickstart.yaml\ngrid: {model.n_layers: [1, 2]}\n", "model.n_layers: unknown key"),
    ("base: ../jobs/quickstart.yaml\ngrid: {}\n", "grid: empty"),
    ("base: ../jobs/quickstart.yaml\ngrid: {model.d_model: []}\n", "grid.model.d_model: expected a non-empty list"),
    ("base: ../jobs/quickstart.yaml\ngrid: {train.lr: [1e-3, -1]}\n", "train.lr: expected a value > 0"),
    ("grid: {model.d_model: [64]}\n", "base: required"),
    ("base: ../jobs/missing.yaml\ngrid: {model.d_model: [64]}\n", "job file not found"),
    ("base: ../jobs/quickstart.yaml\ngrid: {model.d_model: [64]}\nsamples: 3\n", "samples: unknown key"),
    ("base: ../jobs/quickstart.yaml\ngrid: {model.d_model: [64]}\nmax_concurrent_trials: 0\n",
     "max_concurrent_trials: expected an integer > 0"),
    ("base: ../jobs/dot_mult.yaml\ngrid: {model.d_model: [64]}\ntrained_run: some-run\n",
     "model.d_model changes training"),
    ("base: ../jobs/dot_mult.yaml\ngrid: {eval.steps: [1, 0]}\n", "eval.steps: expected a value > 0"),
    ("base: ../jobs/dot_mult.yaml\ngrid: {eval.steps: [1, 2]}\nbaselines: [../jobs/quickstart.yaml method.name=cott]\n",
     "unknown method 'cott'"),
])
def test_bad_sweep_files_fail_before_ray(tmp_path, text, message):
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "jobs").symlink_to(REPO / "jobs")
    path = tmp_path / "search_spaces" / "bad.yaml"
    path.write_text(text)
    result = cli_in_fresh_python("sweep", str(path))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and "NO_RAY" in result.stdout


@pytest.mark.parametrize("content, message", [
    (b"grid: {train.lr: [1.0e-3, .inf]}\n", "trial train.lr=.inf: train.lr: expected a finite number, got inf"),
    (b"grid: {train.lr: [1e400]}\n", "trial train.lr=1e400: train.lr: expected a finite number, got '1e400'"),
    (b"grid: {model.dropout: [.nan]}\n", "model.dropout: expected a finite number, got nan"),
    (b"overrides: [train.weight_decay=.nan]\ngrid: {train.lr: [1.0e-3]}\n",
     "train.weight_decay: expected a finite number, got nan"),
    (b"grid: {method.pack: [-.inf]}\n", "method.pack: expected an integer, got float -inf"),
    (b"grid: {train.lr: [1.0e-3]}\nmax_concurrent_trials: .inf\n", "max_concurrent_trials: expected an integer > 0"),
    (b"grid: {train.lr: [1.0e-3]}\n# \xe9t\xe9\n", "bad.yaml: not a UTF-8 text file (byte 29)"),
    (b"grid: {train.lr: [1.0e-3]}\n\x00\x01", "bad.yaml: not a text file (control character 0x00 at byte 27)"),
])
def test_non_finite_values_and_binary_sweep_files_are_refused_with_one_line(tmp_path, content, message):
    from reasonlab.config import ConfigError
    from reasonlab.sweep import load_sweep

    path = tmp_path / "bad.yaml"
    path.write_bytes(content + f"\nbase: {REPO / 'jobs' / 'quickstart.yaml'}\n".encode())
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_sweep_asks_for_its_hub_model_once_before_ray(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from reasonlab.config import ConfigError
    from reasonlab.sweep import load_sweep

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = tmp_path / "pretrained.yaml"
    path.write_text(f"base: {REPO / 'jobs' / 'quickstart.yaml'}\noverrides: [model.pretrained=owner/model]\n"
                    f"grid: {{train.lr: [1.0e-3, 2.0e-3]}}\n")
    with pytest.raises(ConfigError, match="pretrained.yaml: model.pretrained: owner/model is not in the local"):
        load_sweep(path)


def _run_sweep(path, overrides: list[str], home):
    """`reasonlab sweep PATH OVERRIDES...`, which must succeed → (its output, an MLflow client, the parent run)."""
    result = reasonlab("sweep", str(path), *overrides)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    return out, client, client.get_run(result.stdout.split("MLflow parent run id ")[1].split()[0])


CAPACITY_TINY = ["task.num_profiles=40", "task.relations=2", "task.vocab_size=300", "task.eval_questions=20",
                 "train.max_steps=10", "train.eval_every=10", "train.batch_size=16", "train.warmup_steps=2",
                 "eval.num_examples=20", "eval.test_examples=20", "eval.batch_size=20", "scaling.torch_threads=1"]


def test_a_two_size_capacity_sweep_leaves_a_parent_run_with_the_capacity_table_and_plot(
        ray_head, reasonlab_home, tmp_path):
    path = tmp_path / "two_sizes.yaml"
    path.write_text(f"base: {REPO / 'jobs' / 'capacity.yaml'}\ngrid:\n  model.n_params: [12000, 30000]\n"
                    "max_concurrent_trials: 2\n")
    _, client, parent = _run_sweep(path, CAPACITY_TINY, reasonlab_home)
    parent_id = parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags["reasonlab.sweep"] == "two_sizes"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    sizes = {c.data.params["model.n_params"]: int(c.data.params["param_count"]) for c in children}
    assert sizes["12000"] < sizes["30000"]
    assert all("test/onehop/accuracy" in c.data.metrics and "capacity/1hop_capacity_optimal" in c.data.metrics
               for c in children)
    local = client.download_artifacts(parent_id, "trials.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(open(local).read())))
    assert [r["model.n_params"] for r in rows] == ["12000", "30000"]
    assert [int(r["param_count"]) for r in rows] == [sizes["12000"], sizes["30000"]]
    assert {r["status"] for r in rows} == {"FINISHED"}
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"capacity.csv", "capacity_vs_params.png", "data"} <= artifacts
    capacity = list(csv.DictReader(open(client.download_artifacts(parent_id, "capacity.csv", str(tmp_path)))))
    assert sorted(int(r["n_params"]) for r in capacity) == sorted(sizes.values())
    for r in capacity:
        assert r["num_profiles"] == "40" and r["relations"] == "2" and r["hops"] == "1"
        assert 0 <= float(r["capacity_optimal"]) <= float(r["dataset_entropy_optimal"])
        assert float(r["bits_per_param_optimal"]) == pytest.approx(
            float(r["capacity_optimal"]) / int(r["n_params_used"]))
    # recomputed from the runs' artifacts under another scheme, without retraining
    again = reasonlab("capacity", parent_id, "--scheme", "enumerate", "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "bits/param" in again.stdout and (tmp_path / "again" / "capacity_vs_params.png").stat().st_size > 0
    rerun = list(csv.DictReader(open(tmp_path / "again" / "capacity.csv")))
    assert [r["capacity_enumerate"] for r in rerun] == [r["capacity_enumerate"] for r in capacity]


@pytest.mark.parametrize("store", ["none yet", "existing"])
def test_unknown_trained_or_baseline_runs_fail_before_ray(tmp_path, monkeypatch, store):
    monkeypatch.setenv("REASONLAB_HOME", str(tmp_path / "home"))
    if store == "existing":  # a store with runs in it, but not the one named
        (tmp_path / "home").mkdir()
        client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
        client.create_run(client.create_experiment("reasonlab"))
    for key in ("trained_run: no-such-run", "baselines: [no-such-run]"):
        path = tmp_path / "steps.yaml"
        path.write_text(f"base: {REPO / 'jobs' / 'dot_mult.yaml'}\ngrid: {{eval.steps: [1, 2]}}\n{key}\n")
        result = cli_in_fresh_python("sweep", str(path))
        assert result.returncode == 2, result.stderr
        assert "no run with id or name 'no-such-run'" in result.stderr and "NO_RAY" in result.stdout
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


DOT_TINY = ["task.a_digits=2", "task.b_digits=2", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
            "train.max_steps=20", "train.eval_every=20", "train.batch_size=32", "train.warmup_steps=2",
            "eval.num_examples=16", "eval.test_examples=16", "eval.batch_size=16", "scaling.torch_threads=1"]


def test_a_steps_sweep_trains_once_and_evaluates_each_t_in_a_child_run(ray_head, reasonlab_home, tmp_path):
    path = tmp_path / "steps.yaml"
    path.write_text(f"base: {REPO / 'jobs' / 'dot_mult.yaml'}\ngrid:\n  eval.steps: [1, 2, 4]\n"
                    "max_concurrent_trials: 2\n")
    out, client, parent = _run_sweep(path, DOT_TINY, reasonlab_home)
    parent_id = parent.info.run_id
    sweep_name = parent.info.run_name
    # trained once: one training run, one Ray Train run on disk, and every evaluation used its model
    trained = client.search_runs([parent.info.experiment_id],
                                 filter_string=f"tags.`reasonlab.run_name` LIKE '{sweep_name}%'")
    training = [r for r in trained if r.info.run_id != parent_id and "mlflow.parentRunId" not in r.data.tags]
    assert len(training) == 1 and training[0].info.status == "FINISHED"
    assert training[0].data.params["method.name"] == "diffusion"
    assert list((reasonlab_home / "ray_results").glob(f"{sweep_name}-train*")) and \
        not list((reasonlab_home / "ray_results").glob(f"{sweep_name}-t[0-9]*"))
    assert out.count("training dot_mult.yaml once") == 1
    assert parent.data.tags["reasonlab.trained_run"] == training[0].info.run_id
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted(int(c.data.params["eval.steps"]) for c in children) == [1, 2, 4]
    for c in children:
        assert c.data.tags["reasonlab.trained_run"] == training[0].info.run_id
        assert 0 <= c.data.metrics["eval/accuracy"] <= 1 and c.data.metrics["eval/examples_per_sec"] > 0
        assert "train/loss" not in c.data.metrics  # evaluated, not trained
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"trials.csv", "steps.csv", "steps_vs_accuracy.png"} <= artifacts
    rows = list(csv.DictReader(open(client.download_artifacts(parent_id, "steps.csv", str(tmp_path)))))
    assert [int(r["steps"]) for r in rows] == [1, 2, 4] and {r["kind"] for r in rows} == {"trial"}
    by_id = {c.info.run_id: c for c in children}
    for r in rows:
        assert float(r["accuracy"]) == by_id[r["run_id"]].data.metrics["eval/accuracy"]


def test_steps_table_and_plot_put_the_baselines_beside_the_trials(tmp_path):
    from reasonlab.studies.steps import steps_analysis
    from reasonlab.tracking import local_artifact_root

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("steps", artifact_location=local_artifact_root(uri))
    parent = client.create_run(exp).info.run_id
    for steps, acc, speed in [(4, 0.5, 90.0), (1, 0.1, 300.0), (16, 0.9, 30.0)]:
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
        for k, v in {"method.name": "diffusion", "method.steps": 64, "eval.steps": steps,
                     "method.sampler": "confidence", "eval.samples": 1, "eval.num_examples": 200}.items():
            client.log_param(run, k, v)
        client.log_metric(run, "eval/accuracy", acc)
        client.log_metric(run, "eval/examples_per_sec", speed)
    base = client.create_run(exp).info.run_id
    client.log_param(base, "method.name", "cot")
    client.log_metric(base, "eval/accuracy", 0.97)
    client.log_metric(base, "eval/examples_per_sec", 45.0)
    printed = steps_analysis(client, parent, {"eval.steps": [1, 4, 16]}, {base: "quick-cot"})
    assert "steps.csv" in printed and "cot (quick-cot)" in printed
    rows = list(csv.DictReader(open(client.download_artifacts(parent, "steps.csv", str(tmp_path)))))
    assert [(r["kind"], r["steps"], r["accuracy"]) for r in rows] == [
        ("trial", "1", "0.1"), ("trial", "4", "0.5"), ("trial", "16", "0.9"), ("baseline", "", "0.97")]
    assert rows[-1]["method"] == "cot" and rows[-1]["examples_per_sec"] == "45.0"
    png = client.download_artifacts(parent, "steps_vs_accuracy.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a grid that does not vary T has no steps table
    assert steps_analysis(client, parent, {"eval.samples": [1, 3]}, {}) == ""
