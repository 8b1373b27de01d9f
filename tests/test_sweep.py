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


CAPACITY_TINY = ["task.num_profiles=40", "task.relations=2", "task.vocab_size=300", "task.eval_questions=20",
                 "train.max_steps=10", "train.eval_every=10", "train.batch_size=16", "train.warmup_steps=2",
                 "eval.num_examples=20", "eval.test_examples=20", "eval.batch_size=20", "scaling.torch_threads=1"]


def test_a_two_size_capacity_sweep_leaves_a_parent_run_with_the_capacity_table_and_plot(
        ray_head, reasonlab_home, tmp_path):
    path = tmp_path / "two_sizes.yaml"
    path.write_text(f"base: {REPO / 'jobs' / 'capacity.yaml'}\ngrid:\n  model.n_params: [12000, 30000]\n"
                    "max_concurrent_trials: 2\n")
    result = reasonlab("sweep", str(path), *CAPACITY_TINY)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    parent_id = result.stdout.split("MLflow parent run id ")[1].split()[0]
    client = MlflowClient(f"sqlite:///{reasonlab_home / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["reasonlab.sweep"] == "two_sizes"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    sizes = {c.data.params["model.n_params"]: int(c.data.params["n_params"]) for c in children}
    assert sizes["12000"] < sizes["30000"]
    assert all("test/onehop/accuracy" in c.data.metrics and "capacity/1hop_capacity_optimal" in c.data.metrics
               for c in children)
    local = client.download_artifacts(parent_id, "trials.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(open(local).read())))
    assert [r["model.n_params"] for r in rows] == ["12000", "30000"]
    assert [int(r["n_params"]) for r in rows] == [sizes["12000"], sizes["30000"]]
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
