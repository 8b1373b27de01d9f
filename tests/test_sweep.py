"""Sweeps: bad files fail before Ray; a grid runs as Tune trials, each a child MLflow run of one parent."""
from __future__ import annotations

import csv
import io

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, cli_in_fresh_python, reasonlab
from test_train_ray import TINY




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


def test_a_two_trial_sweep_leaves_a_parent_run_with_two_child_runs(ray_head, reasonlab_home, tmp_path):
    path = tmp_path / "two_sizes.yaml"
    path.write_text(f"base: {REPO / 'jobs' / 'quickstart.yaml'}\ngrid:\n  model.d_model: [16, 32]\n"
                    "max_concurrent_trials: 2\n")
    result = reasonlab("sweep", str(path), *TINY, "train.max_steps=10", "train.eval_every=10")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    parent_id = result.stdout.split("MLflow parent run id ")[1].split()[0]
    client = MlflowClient(f"sqlite:///{reasonlab_home / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["reasonlab.sweep"] == "two_sizes"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted(c.data.params["model.d_model"] for c in children) == ["16", "32"]
    sizes = {c.data.params["model.d_model"]: int(c.data.params["n_params"]) for c in children}
    assert sizes["16"] < sizes["32"]
    assert all("test/accuracy" in c.data.metrics for c in children)
    local = client.download_artifacts(parent_id, "trials.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(open(local).read())))
    assert [r["model.d_model"] for r in rows] == ["16", "32"]
    assert [int(r["n_params"]) for r in rows] == [sizes["16"], sizes["32"]]
    assert {r["status"] for r in rows} == {"FINISHED"} and all(r["test/accuracy"] for r in rows)
