"""Stepwise internalization end to end on the session's local Ray instance: the chain is taken away on
schedule, the finished model answers without one, and a run killed mid-removal resumes on schedule."""
from __future__ import annotations

import json

import pytest

from conftest import reasonlab
from test_train_ray import TINY, _artifacts, _client, _run, kill_after_first_checkpoint

pytestmark = pytest.mark.ray

# 2×2 (an 8-token chain), 16 examples a step, 10 steps an epoch; one token every 5 steps after 20 steps
# of full CoT: 4 tokens gone at the first checkpoint (step 40), all at step 60, then 140 steps without
SI = [*TINY, "train.lr=3e-3", "method.epoch_examples=160", "method.remove_per_epoch=2", "method.pretrain_epochs=2",
      "train.max_steps=200", "train.eval_every=40"]


def _expected_removed(step: int) -> float:
    """The scheduled count logged at `step` (that of the batch just trained), capped at the chain."""
    t = step - 1
    return float(min(8, (t - 20) // 5)) if t >= 20 else 0.0


def test_killed_internalization_resumes_on_schedule_and_ends_without_a_chain(ray_head, reasonlab_home, tmp_path):
    name = "si-killed"
    args = ["train", "jobs/si_mult_2x2.yaml", *SI, f"tracking.run_name={name}"]
    registered = kill_after_first_checkpoint(args, name, reasonlab_home)  # at step 40: 4 of 8 tokens gone
    assert 0 < registered < 200
    assert 0 < _expected_removed(registered) < 8 or registered > 60

    result = reasonlab(*args)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    resumed_at = int(out.split("resumed from the checkpoint at step ")[1].split(";")[0])
    assert resumed_at == registered
    run = _run(reasonlab_home, name)
    assert run.info.status == "FINISHED"
    client = _client(reasonlab_home)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/cot_tokens_removed")}
    assert history and all(v == _expected_removed(s) for s, v in history.items()), history
    assert max(history) == 200 and history[200] == 8.0  # the whole chain
    assert any(s > resumed_at for s in history) and any(s <= resumed_at for s in history)
    assert "cot_tokens_removed 8" in out  # on the step line too

    files = _artifacts(client, run.info.run_id)
    assert {"internalization.png", "predictions.jsonl", "model/model.safetensors"} <= files
    local = client.download_artifacts(run.info.run_id, "predictions.jsonl", str(tmp_path))
    predictions = [json.loads(line) for line in open(local)]
    assert predictions
    for p in predictions:  # greedy from the prompt: `<eos> #### answer <eos>`, nothing written before `####`
        before = p["generated"].split("####")[0]
        assert before.replace("<|endoftext|>", "").strip() == "", p["generated"]
    assert "test/accuracy" in run.data.metrics and "eval/accuracy" in run.data.metrics
