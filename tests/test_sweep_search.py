"""Search spaces beyond grids (Tune's sample domains, repeated seeds), early stopping with Tune's ASHA, and resuming
an interrupted sweep under its parent run with Tune's restore."""
from __future__ import annotations

import csv
import io
import math
import signal
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, REPO, cli_in_fresh_python, reasonlab

QUICK = REPO / "jobs" / "quickstart.yaml"


def _sweep_file(tmp_path, body: str):
    path = tmp_path / "search.yaml"
    path.write_text(f"base: {QUICK}\n{body}")
    return path


@pytest.mark.parametrize("body, message", [
    ("sample: {train.lr: {normal: [0, 1]}}\n", "sample.train.lr: expected one of {choice: a list of values}"),
    ("sample: {train.lr: {loguniform: [0, 1.0e-3]}}\n", "loguniform: expected bounds > 0"),
    ("sample: {train.lr: {uniform: [1.0e-2, 1.0e-3]}}\n", "uniform: expected [low, high] with low < high"),
    ("sample: {train.lr: {uniform: [1.0e-3, .inf]}}\n", "uniform: expected [low, high] with low < high"),
    ("sample: {train.warmup_steps: {randint: [0.5, 10]}}\n", "randint: expected integer bounds"),
    ("sample: {model.d_model: {choice: []}}\n", "choice: expected a non-empty list"),
    ("grid: {train.lr: [1.0e-3]}\nsample: {train.lr: {choice: [1.0e-3]}}\n", "train.lr: in both grid and sample"),
    ("grid: {train.lr: [1.0e-3]}\nnum_samples: 3\n", "num_samples: 3 draws need sample:"),
    ("grid: {train.seed: [1, 2]}\nseeds: 2\n", "seeds: train.seed is also varied by the sweep"),
    ("grid: {train.lr: [1.0e-3]}\nseeds: 0\n", "seeds: expected an integer > 0"),
    # the sampled ends are validated as whole jobs
    ("sample: {train.lr: {uniform: [-1, 1.0e-3]}}\n", "trial train.lr=-1: train.lr: expected a value > 0"),
    ("sample: {model.n_head: {choice: [4, 3]}}\n", "model.n_head=3"),
    ("grid: {train.lr: [1.0e-3]}\nscheduler: {name: hyperband}\n", "scheduler: expected a mapping with name: one of"),
    ("grid: {train.lr: [1.0e-3]}\nscheduler: {name: asha, metric: train/tokens_per_sec}\n",
     "scheduler.metric: expected a metric the trials report at each evaluation"),
    ("grid: {train.lr: [1.0e-3]}\nscheduler: {name: asha, metric: eval/accuracy, mode: up}\n",
     "scheduler.mode: expected max or min"),
    ("grid: {train.lr: [1.0e-3]}\nscheduler: {name: asha, metric: eval/accuracy, grace_period: 5000}\n",
     "scheduler.grace_period: 5000 is past train.max_steps=800"),
    ("grid: {train.lr: [1.0e-3]}\nscheduler: {name: asha, metric: eval/accuracy, reduction_factor: 1}\n",
     "scheduler.reduction_factor: expected a number > 1"),
    ("grid: {train.lr: [1.0e-3]}\nscheduler: {name: asha, metric: eval/accuracy, patience: 3}\n",
     "scheduler.patience: unknown key"),
    ("grid: {eval.batch_size: [1, 8]}\nscheduler: {name: asha, metric: eval/accuracy}\n",
     "scheduler: stops trainings early; this sweep only evaluates one model"),
    ("grid: {train.lr: [1.0e-3]}\nsweep_name: my sweep\n", "sweep_name: expected a name of letters"),
])
def test_bad_search_spaces_are_refused_with_one_line(tmp_path, body, message):
    from reasonlab.config import ConfigError
    from reasonlab.sweep import load_sweep

    with pytest.raises(ConfigError) as e:
        load_sweep(_sweep_file(tmp_path, body))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_tune_draws_the_samples_and_each_trial_gets_its_grid_point_seed_and_draws(tmp_path):
    from ray.tune.search.variant_generator import generate_variants

    from reasonlab.sweep import load_sweep

    sweep = load_sweep(_sweep_file(tmp_path, (
        "overrides: [train.seed=10]\ngrid: {model.n_layer: [1, 2]}\n"
        "sample:\n  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n  model.d_model: {choice: [32, 64]}\n"
        "  train.warmup_steps: {randint: [0, 5]}\n  model.dropout: {uniform: [0.0, 0.2]}\n"
        "num_samples: 3\nseeds: 2\n")))
    assert sweep.num_trials == 2 * 2 * 3 and sweep.max_concurrent_trials == 12
    assert sweep.varied == ["model.n_layer", "train.lr", "model.d_model", "train.warmup_steps", "model.dropout",
                            "train.seed"]
    assert not sweep.eval_only
    seen = set()
    for _ in range(3):  # num_samples repeats of Tune's variants, each draw kept across the grid and the seeds
        draws = set()
        for _, config in generate_variants(sweep.tune_space(), constant_grid_search=True):
            cfg = sweep.config_of(config)
            assert cfg.model.n_layer == [1, 2][config["trial"]] and cfg.train.seed == 10 + config["seed"]
            assert 1e-4 <= cfg.train.lr <= 1e-2 and cfg.model.d_model in (32, 64)
            assert 0 <= cfg.train.warmup_steps < 5 and 0 <= cfg.model.dropout <= 0.2
            assert isinstance(cfg.train.warmup_steps, int)
            seen.add((cfg.model.n_layer, cfg.train.seed, cfg.train.lr))
            draws.add((cfg.train.lr, cfg.model.d_model, cfg.train.warmup_steps, cfg.model.dropout))
        assert len(draws) == 1  # one draw for all four grid points and seeds
    assert len(seen) == 12 and len({lr for _, _, lr in seen}) == 3


def test_seeds_aggregate_into_a_mean_with_a_95_percent_t_interval():
    from reasonlab.analysis.intervals import grouped, mean_interval
    from reasonlab.sweep import Sweep, aggregate_seeds

    mean, half = mean_interval([0.5, 0.7, 0.9])
    # sd 0.2, t(0.975, 2 dof) = 4.3027: half-width 4.3027 * 0.2 / sqrt(3)
    assert mean == pytest.approx(0.7) and half == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_interval([0.3])[1])
    assert grouped([(2.0, 1.0), (1.0, 5.0), (2.0, 3.0)]) == [(1.0, 5.0, 0.0), (2.0, 2.0, pytest.approx(12.7062, 1e-4))]
    sweep = Sweep("s", QUICK, [], {"model.n_layer": [1, 2]}, 1, trials=[[], []], seeds=3)
    table = ("trial,model.n_layer,train.seed,n_params,status,stopped_at,eval/accuracy,test/accuracy,run_id\n"
             "0,1,0,10,FINISHED,,0.5,0.4,a\n1,1,1,10,FINISHED,,0.7,0.6,b\n2,1,2,10,FINISHED,,0.9,0.8,c\n"
             "3,2,0,20,FINISHED,,1.0,1.0,d\n4,2,1,20,KILLED,4,0.1,,e\n5,2,2,20,FAILED,,,,f\n")
    rows = list(csv.DictReader(io.StringIO(aggregate_seeds(table, sweep))))
    assert [(r["model.n_layer"], r["seeds"]) for r in rows] == [("1", "3"), ("2", "1")]  # finished seeds only
    assert float(rows[0]["eval/accuracy"]) == pytest.approx(0.7)
    assert float(rows[0]["eval/accuracy±"]) == pytest.approx(half, rel=1e-5)
    assert float(rows[0]["test/accuracy"]) == pytest.approx(0.6) and rows[1]["eval/accuracy±"] == ""


def test_resuming_a_sweep_that_does_not_exist_is_one_line_before_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("REASONLAB_HOME", str(tmp_path / "home"))
    result = cli_in_fresh_python("sweep", str(_sweep_file(tmp_path, "grid: {train.lr: [1.0e-3]}\n")),
                                 "--resume", "search-20990101-000000-abcd")
    assert result.returncode == 2, result.stderr
    assert "--resume: no sweep named 'search-20990101-000000-abcd'" in result.stderr and "NO_RAY" in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


TINY = ["task.a_digits=2", "task.b_digits=2", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
        "train.batch_size=16", "train.warmup_steps=2", "eval.num_examples=16", "eval.test_examples=16",
        "scaling.torch_threads=1"]


def _children(client, parent):
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_search_sweep_stopped_by_sigterm_resumes_under_its_parent_and_asha_stops_weak_trials(
        ray_head, reasonlab_home, tmp_path):
    # a learning rate of 1e-6 leaves the loss where it started: ASHA on the training loss stops those trials at
    # the first rung, deterministically (Tune runs the grid in order, the good rate's two seeds first)
    path = _sweep_file(tmp_path, (
        "grid: {train.lr: [3.0e-3, 1.0e-6]}\nsample: {model.dropout: {uniform: [0.0, 0.05]}}\nseeds: 2\n"
        "scheduler: {name: asha, metric: train/loss, mode: min, grace_period: 4, reduction_factor: 2}\n"
        "max_concurrent_trials: 1\n"))
    overrides = [*TINY, "train.max_steps=12", "train.eval_every=4", "train.log_every=2", "train.checkpoint_every=4",
                 "train.warmup_steps=1"]
    proc = subprocess.Popen([str(BIN / "reasonlab"), "sweep", str(path), *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(f"sqlite:///{reasonlab_home / 'mlflow.db'}")

    def runs(name):
        return {r.info.run_name: r for r in client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`reasonlab.run_name` LIKE '{name}%'")}

    try:
        first = proc.stdout.readline()
        assert first.startswith("sweep search-"), first
        name = first.split()[1].rstrip(":")
        # stopped (as `kill` does) once the first trial has finished and the second has started
        _wait_for(lambda: f"{name}-t1" in runs(name) and runs(name)[f"{name}-t0"].info.status == "FINISHED",
                  300, "the second trial")
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        rest = proc.communicate(timeout=120)[0]
        assert time.monotonic() - stopped < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, rest[-3000:]
    assert f"reasonlab sweep {path} --resume {name}" in rest
    before = runs(name)
    assert before[name].info.status == "KILLED" and "RUNNING" not in {r.info.status for r in before.values()}
    assert before[f"{name}-t0"].info.status == "FINISHED" and before[f"{name}-t1"].info.status == "KILLED"

    resumed = reasonlab("sweep", str(path), *overrides, "--resume", name)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert f"MLflow parent run id {before[name].info.run_id}" in resumed.stdout and f"sweep {name}: resuming" in out
    after = runs(name)
    assert len(after) == 5 and after[name].info.status == "FINISHED"  # the parent and four trials
    t0, t1 = after[f"{name}-t0"], after[f"{name}-t1"]
    # the finished trial was kept as it was; the interrupted one continued its own run
    assert t0.info.run_id == before[f"{name}-t0"].info.run_id and t0.info.end_time == before[f"{name}-t0"].info.end_time
    assert t1.info.run_id == before[f"{name}-t1"].info.run_id and t1.info.status == "FINISHED"
    for c in after.values():
        if c.info.run_name != name:
            assert 0 <= float(c.data.params["model.dropout"]) <= 0.05  # drawn by Tune from the uniform range
    for t in (f"{name}-t2", f"{name}-t3"):
        assert after[t].info.status == "KILLED" and after[t].data.tags["reasonlab.stopped_early"] == "4"
        assert f"{t}: stopped early at step 4 by the scheduler" in out
    parent_id = before[name].info.run_id
    trials = list(csv.DictReader(open(client.download_artifacts(parent_id, "trials.csv", str(tmp_path)))))
    assert [(r["train.lr"], r["train.seed"], r["status"], r["stopped_at"]) for r in trials] == [
        ("0.003", "0", "FINISHED", ""), ("0.003", "1", "FINISHED", ""), ("1e-06", "0", "KILLED", "4"),
        ("1e-06", "1", "KILLED", "4")]
    configurations = list(csv.DictReader(open(client.download_artifacts(parent_id, "configurations.csv",
                                                                         str(tmp_path)))))
    # the good rate's seeds share its drawn dropout: one configuration averaged over both; stopped trials are not
    assert [(r["train.lr"], r["seeds"]) for r in configurations] == [("0.003", "2")]
    assert 0 <= float(configurations[0]["test/accuracy"]) <= 1 and configurations[0]["train/loss±"] != ""
    again = reasonlab("sweep", str(path), "--resume", name)
    assert again.returncode == 2 and "sweep already finished" in again.stderr


def test_the_sweep_progress_bar_counts_done_running_and_pending_trials(capsys):
    from types import SimpleNamespace

    from reasonlab.sweep import TrialProgress

    progress = TrialProgress(5)
    trials = [SimpleNamespace(status=s) for s in ("TERMINATED", "ERROR", "RUNNING", "PENDING")]
    progress.on_trial_start(0, trials, trials[2])
    assert progress.bar.n == 2 and progress.bar.total == 5
    assert progress.bar.postfix == "running=1, pending=2, failed=1"  # one pending, one not yet made by Tune
    trials[2].status = "TERMINATED"
    progress.on_experiment_end(trials)
    assert progress.bar.n == 3 and "3/5" in capsys.readouterr().err


def test_study_plots_draw_repeated_seeds_as_their_mean_with_the_interval(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from reasonlab.analysis.capacity import plot_capacity
    from reasonlab.analysis.grokking import plot_steps_vs_phi
    from reasonlab.analysis.intervals import mean_interval

    drawn = []
    real = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, yerr=None, **kw: (
        drawn.append((list(x), list(y), list(yerr))), real(self, x, y, yerr=yerr, **kw))[1])
    # capacity: one size with three seeds, another with one model (its own sampling interval)
    rows = [{"hops": 1, "num_profiles": 40, "relations": 2, "n_params_used": size, "capacity_optimal": c,
             "ci95_optimal": 5.0, "dataset_entropy_optimal": 900.0} for size, c in
            [(1000, 100.0), (1000, 120.0), (1000, 140.0), (3000, 300.0)]]
    plot_capacity(rows, str(tmp_path / "c.png"))
    x, y, err = drawn[0]
    assert x == [1000, 3000] and y == [pytest.approx(120.0), 300.0]
    assert err == [pytest.approx(mean_interval([100.0, 120.0, 140.0])[1]), 5.0]
    drawn.clear()
    grok = [{"phi": phi, "weight_decay": 0.1, "grad_filter": "none", "steps_to_fit": fit, "steps_to_id50": None,
             "steps_to_id95": None, "steps": 5000, "best_id": 0.5, "best_ood": 0.1}
            for phi, fit in [(3.6, 1000), (3.6, 1400), (7.2, 2000)]]
    plot_steps_vs_phi(grok, str(tmp_path / "g.png"))
    fit_x, fit_y, fit_err = drawn[0]
    assert fit_x == [3.6, 7.2] and fit_y == [1200.0, 2000.0]
    assert fit_err[0] == pytest.approx(mean_interval([1000, 1400])[1]) and fit_err[1] == 0.0


def test_a_fit_that_tunes_ctrl_c_handler_ended_is_told_from_one_that_finished():
    import os

    from ray.tune.tune import _setup_signal_catching  # what Tuner.fit installs for its run

    from reasonlab.stopping import tune_interruption

    before = signal.getsignal(signal.SIGINT)
    with tune_interruption() as interrupted:
        _setup_signal_catching()  # a fit that ends normally leaves Tune's handler in place
    assert interrupted == [False] and signal.getsignal(signal.SIGINT) is before
    with tune_interruption() as interrupted:
        event = _setup_signal_catching()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the fit: Tune stops it and puts the marker back
        time.sleep(0.1)
    assert event.is_set() and interrupted == [True] and signal.getsignal(signal.SIGINT) is before
