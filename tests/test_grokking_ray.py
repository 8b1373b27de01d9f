"""The grokking study end to end on local Ray: a tiny φ sweep leaves dense curves of the five named sets, the
grokking table and plots, snapshots apart from the (sparser) checkpoints; `reasonlab probe` reads a trial's
snapshot and final model into child runs, and refuses bad runs, steps and targets with one line."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, reasonlab
from reasonlab.cli import main

TINY = ["task.entities=30", "task.relations=6", "task.relations_per_entity=3", "task.ood_ratio=0.2",
        "task.id_test_ratio=0.2", "task.eval_size=40", "model.n_layer=2", "model.d_model=32", "model.n_head=2",
        "train.max_steps=30", "train.batch_size=32", "train.warmup_steps=2", "train.eval_every=10",
        "train.checkpoint_every=30", "train.snapshot_steps=[10]", "train.log_every=10", "eval.num_examples=40",
        "eval.batch_size=40", "eval.log_predictions=2", "scaling.torch_threads=1"]
SETS = ("train_inferred", "id_atomic", "ood_atomic", "test_inferred_id", "test_inferred_ood")


@pytest.fixture(scope="module")
def grokking_sweep(ray_head, reasonlab_home, tmp_path_factory):
    path = tmp_path_factory.mktemp("grok") / "tiny_grokking.yaml"
    path.write_text(f"base: {REPO / 'jobs' / 'grokking.yaml'}\ngrid:\n  task.phi: [0.5, 1.5]\n"
                    "max_concurrent_trials: 2\n")
    result = reasonlab("sweep", str(path), *TINY)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{reasonlab_home / 'mlflow.db'}")
    parent = client.get_run(result.stdout.split("MLflow parent run id ")[1].split()[0])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return result.stdout, client, parent, children


def test_the_sweep_leaves_dense_curves_the_table_and_plots_with_snapshots_apart_from_checkpoints(
        grokking_sweep, reasonlab_home, tmp_path):
    out, client, parent, children = grokking_sweep
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        for name in SETS:  # evaluated at every eval_every, not only where checkpoints were taken
            history = client.get_metric_history(child.info.run_id, f"eval/{name}/accuracy")
            assert sorted(m.step for m in history) == [10, 20, 30], name
        assert 0 < child.data.metrics["time/eval_share"] < 1
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "snapshots")}
        assert artifacts == {"snapshots/step_00000010"}
        assert "grokking_curves.png" in {a.path for a in client.list_artifacts(child.info.run_id)}  # each run's own
        run_dir = Path(reasonlab_home) / "ray_results" / child.data.tags["reasonlab.run_name"]
        assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000030"]  # checkpoint_every=30
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"grokking.csv", "grokking_curves.png", "steps_to_grok_vs_phi.png"} <= artifacts
    rows = list(csv.DictReader(io.StringIO(open(client.download_artifacts(
        parent.info.run_id, "grokking.csv", str(tmp_path))).read())))
    assert [float(r["phi"]) for r in rows] == [0.5, 1.5]
    by_id = {c.info.run_id: c for c in children}
    for r in rows:
        history = client.get_metric_history(r["run_id"], "eval/test_inferred_id/accuracy")
        assert float(r["best_id"]) == pytest.approx(max(m.value for m in history))
        assert by_id[r["run_id"]].data.params["task.phi"] == r["phi"]
    assert "ID 95% at" in out and "grokking.csv" in out


def test_probe_reads_a_snapshot_and_the_final_model_into_child_runs(grokking_sweep, tmp_path, capsys):
    _, client, parent, children = grokking_sweep
    trial = children[0]
    name = trial.data.tags["reasonlab.run_name"]
    assert main(["probe", name, "--step", "10", "--examples", "30"]) == 0  # the CLI, in this process
    out = capsys.readouterr().out
    assert "bridge" in out and "at step 10" in out
    probes = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
    assert len(probes) == 1 and probes[0].info.status == "FINISHED"
    probe_id = probes[0].info.run_id
    assert probes[0].data.params["probe.model"] == "snapshots/step_00000010"
    names = {a.path for a in client.list_artifacts(probe_id)}
    assert {"logit_lens.csv", "logit_lens.png", "linear_probes.csv", "linear_probes.png"} <= names
    lens = list(csv.DictReader(open(client.download_artifacts(probe_id, "logit_lens.csv", str(tmp_path)))))
    probe_sets = ("train_inferred", "test_inferred_id", "test_inferred_ood")
    assert {(r["set"], r["target"]) for r in lens} == {(s, t) for s in probe_sets for t in ("answer", "bridge")}
    assert {int(r["layer"]) for r in lens} == {0, 1, 2}
    linear = list(csv.DictReader(open(client.download_artifacts(probe_id, "linear_probes.csv", str(tmp_path)))))
    assert {r["target"] for r in linear} == {"bridge"} and len(linear) == 3 * 3
    # the final model, the logit lens only
    assert main(["probe", trial.info.run_id, "--kind", "logit_lens", "--examples", "20"]) == 0
    probes = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
    final = [p for p in probes if p.data.params["probe.model"] == "model"]
    assert len(final) == 1 and {a.path for a in client.list_artifacts(final[0].info.run_id)} >= {
        "logit_lens.csv", "logit_lens.png"}


def test_probe_refuses_bad_runs_steps_and_targets_in_one_line(grokking_sweep, capsys):
    _, client, parent, children = grokking_sweep
    name = children[0].data.tags["reasonlab.run_name"]
    running = client.create_run(parent.info.experiment_id, tags={"reasonlab.run_name": "still-running"})
    cases = [(["probe", "no-such-run"], "no run with id or name 'no-such-run'"),
             (["probe", "still-running"], "is RUNNING, not FINISHED"),
             (["probe", name, "--step", "7"], "no snapshot at step 7; its snapshots: 10"),
             (["probe", name, "--target", "tail"], "--target: tail: the task knowledge_graph declares bridge"),
             (["probe", name, "--examples", "1"], "--examples: expected at least 2")]
    try:
        for argv, message in cases:
            before = len(client.search_runs([parent.info.experiment_id]))
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
            assert len(client.search_runs([parent.info.experiment_id])) == before  # nothing was started
    finally:
        client.set_terminated(running.info.run_id, "KILLED")
