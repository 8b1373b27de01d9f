"""The grokking study's core pieces without Ray: Grokfast's gradient filter, snapshot steps, evaluation
apart from checkpoints (config), the grokking table's measures and plots from hand-made curves."""
from __future__ import annotations

import pytest
import torch

from reasonlab.analysis.grokking import fit_step, grokking_row, plot_curves, plot_steps_vs_phi
from reasonlab.config import ConfigError, config_from_dict
from reasonlab.loop import TrainLoop
from reasonlab.methods.base import Method

CPU = torch.device("cpu")


def _cfg(**train):
    return config_from_dict({"task": {"name": "knowledge_graph", "entities": 30, "relations": 6,
                                      "relations_per_entity": 3, "ood_ratio": 0.2, "id_test_ratio": 0.2, "phi": 1.0},
                             "method": {"name": "qa"}, "train": train})


class _Squares(Method):
    """A method whose loss is a fixed function of the weights: gradients known in advance."""
    def loss(self, model, batch):
        return (model.weight * batch["scale"]).square().sum(), {}


def test_grokfast_ema_adds_lambda_times_the_running_average_of_gradients_and_resumes_it():
    cfg = _cfg(grad_filter="ema", grad_filter_alpha=0.9, grad_filter_lambda=3.0, grad_clip=0.0, lr=0.1,
               weight_decay=0.0, warmup_steps=0).train
    model = torch.nn.Linear(2, 1, bias=False)
    loop = TrainLoop(model, _Squares(), cfg, CPU)
    seen = []
    loop.optimizer.step = lambda *a, **k: seen.append(model.weight.grad.clone())  # the gradient AdamW would get
    w = model.weight.detach().clone()
    loop.train_step([{"scale": torch.tensor(1.0)}])
    g1 = 2 * w
    assert torch.allclose(seen[0], g1 + 3.0 * g1)  # the first gradient starts the average
    loop.train_step([{"scale": torch.tensor(2.0)}])
    g2 = 8 * w  # the weights did not move (the optimizer's step was replaced)
    ema = 0.9 * g1 + 0.1 * g2
    assert torch.allclose(seen[1], g2 + 3.0 * ema)
    # a resumed loop continues from the same average
    state = loop.state_dict()
    other = TrainLoop(torch.nn.Linear(2, 1, bias=False), _Squares(), cfg, CPU)
    other.load_state_dict(state)
    assert torch.allclose(other.grad_ema["weight"], ema)
    # without the filter the optimizer gets the plain gradient
    plain = TrainLoop(model, _Squares(), _cfg(grad_clip=0.0).train, CPU)
    plain.optimizer.step = lambda *a, **k: seen.append(model.weight.grad.clone())
    plain.train_step([{"scale": torch.tensor(1.0)}])
    assert torch.allclose(seen[-1], g1) and not plain.grad_ema


def test_snapshot_steps_are_a_list_or_a_log_spaced_count_and_checkpoints_default_to_evaluations():
    assert _cfg(max_steps=1000, snapshot_steps=4).train.snapshots() == [1, 10, 100, 1000]
    assert _cfg(max_steps=50, snapshot_steps=[40, 5, 5]).train.snapshots() == [5, 40]
    assert _cfg(max_steps=50).train.snapshots() == []
    assert _cfg(eval_every=50).train.checkpoint_interval == 50
    assert _cfg(eval_every=50, checkpoint_every=500).train.checkpoint_interval == 500


@pytest.mark.parametrize("train, key", [
    ({"snapshot_steps": [0]}, "train.snapshot_steps"),
    ({"max_steps": 10, "snapshot_steps": [11]}, "train.snapshot_steps"),
    ({"snapshot_steps": 0}, "train.snapshot_steps"), ({"checkpoint_every": 0}, "train.checkpoint_every"),
    ({"grad_filter_alpha": 1.0}, "train.grad_filter_alpha"), ({"grad_filter_lambda": -1}, "train.grad_filter_lambda"),
    ({"grad_filter": "ma"}, "train.grad_filter")])
def test_bad_snapshot_and_filter_values_name_their_key(train, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(**train)


def _curves(train, atomic, test_id, test_ood, steps=(10, 100, 1000, 10000)):
    key = "eval/{}/accuracy".format
    return {key("train_inferred"): list(zip(steps, train)), key("id_atomic"): list(zip(steps, atomic)),
            key("ood_atomic"): list(zip(steps, atomic)), key("test_inferred_id"): list(zip(steps, test_id)),
            key("test_inferred_ood"): list(zip(steps, test_ood))}


def test_the_table_finds_the_fit_the_grokking_step_and_the_best_accuracies(tmp_path):
    grokked = _curves(train=[0.1, 0.995, 1.0, 1.0], atomic=[0.5, 1.0, 1.0, 1.0], test_id=[0.0, 0.2, 0.6, 0.97],
                      test_ood=[0.0, 0.01, 0.03, 0.02])
    row = grokking_row(grokked)
    assert row["steps_to_fit"] == 100 and row["steps_to_id95"] == 10000 and row["grok_delay"] == 100
    assert row["steps_to_id50"] == 1000
    assert row["best_id"] == 0.97 and row["best_ood"] == 0.03 and row["final_ood"] == 0.02
    # the atomic facts not yet fit at 100 steps: the training set is fit only when every trained set is
    late = _curves(train=[0.1, 1.0, 1.0, 1.0], atomic=[0.5, 0.9, 1.0, 1.0], test_id=[0, 0, 0, 0], test_ood=[0, 0, 0, 0])
    assert fit_step(late) == 1000
    never = grokking_row(late)
    assert never["steps_to_id95"] is None and never["grok_delay"] is None and never["best_id"] == 0
    plot_curves([("phi=18", grokked), ("phi=3.6", late)], str(tmp_path / "curves.png"))
    rows = [{"phi": 18.0, "weight_decay": 0.1, "grad_filter": "none", "steps": 10000, **row},
            {"phi": 3.6, "weight_decay": 0.1, "grad_filter": "none", "steps": 10000, **never}]
    plot_steps_vs_phi(rows, str(tmp_path / "phi.png"))
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "phi.png").stat().st_size > 10_000


def test_a_knowledge_graph_run_draws_its_own_curves_and_other_tasks_draw_nothing(tmp_path):
    from reasonlab.tasks import make_task

    task = make_task(_cfg().task)
    curves = _curves(train=[0.1, 1.0, 1.0, 1.0], atomic=[0.5, 1.0, 1.0, 1.0], test_id=[0, 0.3, 0.7, 0.96],
                     test_ood=[0, 0, 0.02, 0.01])
    task.finish(lambda: {**curves, "train/loss": [(10, 2.0), (10000, 0.01)]}, str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["grokking_curves.png"]
    assert (tmp_path / "grokking_curves.png").stat().st_size > 10_000
    (tmp_path / "grokking_curves.png").unlink()
    task.finish(lambda: {"train/loss": [(10, 2.0)]}, str(tmp_path))  # never evaluated: no empty plot
    multiplication = make_task(config_from_dict({"task": {"name": "multiplication"}, "method": {"name": "cot"}}).task)
    multiplication.finish(lambda: curves, str(tmp_path))
    assert list(tmp_path.iterdir()) == []
