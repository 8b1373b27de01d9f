"""Stepwise internalization in the core, on hand-made rows: removal spans, the schedule s(step), the
offset distribution, optimizer resets (also across a resume), and the method interface it plugs into."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import ICOT, REPO
from reasonlab.config import ConfigError, config_from_dict
from reasonlab.loop import TrainLoop
from reasonlab.methods import IGNORE, METHODS, Method, make_method, sequence_length
from reasonlab.methods.internalize import MAX_OFFSET, remove_span, removal_offsets
from reasonlab.models import build_causal_lm
from reasonlab.tasks import make_task
from reasonlab.tokenizer import build_tokenizer

CPU = torch.device("cpu")
REPO_JOBS = REPO / "jobs"


def _si(task=None, train=None, **method):
    data = {"task": task or {"name": "multiplication", "a_digits": 2, "b_digits": 2},
            "method": {"name": "internalize", **method}, "train": {"batch_size": 64, **(train or {})}}
    cfg = config_from_dict(data)
    t = make_task(cfg.task)
    tok = build_tokenizer(t)
    m = make_method(cfg.method, cfg)
    m.setup(t, tok)
    return cfg, t, tok, m


def _text(tok, row: dict) -> str:
    return tok.decode(row["input_ids"][row["attention_mask"] == 1])


# ---- removal spans ----

def test_left_and_right_removal_keep_the_chains_closing_eos():
    _, task, tok, m = _si()
    e = task.examples(0, 1)[0]
    eos = tok.eos_token
    ids = tok(m.prompt_text(e, eos) + m.target_text(e, eos), add_special_tokens=False)["input_ids"]
    cot = e.cot.split()
    assert len(cot) == m.cot_tokens == 8  # 2×2: `d d d + d d d d`
    for n in (0, 1, 3, 7):
        left = tok.decode(remove_span(ids, tok.eos_token_id, n, "left"))
        right = tok.decode(remove_span(ids, tok.eos_token_id, n, "right"))
        assert left == f"{e.prompt} {eos} {' '.join(cot[n:])} {eos} #### {e.answer} {eos}"
        assert right == f"{e.prompt} {eos} {' '.join(cot[:len(cot) - n])} {eos} #### {e.answer} {eos}"
    for n in (8, 9, 100, math.inf):  # everything, never past the chain's EOS
        for side in ("left", "right"):
            removed = tok.decode(remove_span(ids, tok.eos_token_id, n, side))
            assert removed == f"{e.prompt} {eos} {eos} #### {e.answer} {eos}"
    # anything after the third EOS (padding) is dropped
    assert remove_span(ids + [tok.eos_token_id] * 3, tok.eos_token_id, 2, "left") == \
        remove_span(ids, tok.eos_token_id, 2, "left")


def test_encoded_rows_lose_the_scheduled_tokens_with_labels_and_positions_recounted():
    cfg, task, tok, m = _si(epoch_examples=640, remove_per_epoch=2, pretrain_epochs=1, smoothing_lambda=None)
    seq_len = sequence_length(task, m, tok)
    examples = task.examples(0, 4)
    full = m.encode(examples, tok, seq_len)  # no stream position: nothing removed (the `cot` rows)
    assert (full["input_ids"] == METHODS["cot"]().encode(examples, tok, seq_len)["input_ids"]).all()
    # 10 steps per epoch, one token every 5 steps after the first epoch: step 27 removes (27 - 10) // 5 = 3
    step = 27
    rows = m.encode(examples, tok, seq_len, indices=np.arange(step * 64, step * 64 + 4))
    eos = tok.eos_token
    for i, e in enumerate(examples):
        row = {k: v[i] for k, v in rows.items()}
        kept = " ".join(e.cot.split()[3:])
        assert _text(tok, row) == f"{e.prompt} {eos} {kept} {eos} #### {e.answer} {eos}"
        length = int(row["attention_mask"].sum())
        assert (row["attention_mask"][:length] == 1).all()  # contiguous: positions 0..L'-1 recomputed
        assert length == int(full["attention_mask"][i].sum()) - 3
        first = int(np.argmax(row["input_ids"] == tok.eos_token_id))
        assert (row["labels"][: first + 1] == IGNORE).all() and (row["labels"][length:] == IGNORE).all()
        assert (row["labels"][first + 1: length] == row["input_ids"][first + 1: length]).all()


# ---- the schedule ----

def test_schedule_counts_tokens_per_epoch_after_pretraining():
    cfg, _, _, m = _si(epoch_examples=640, remove_per_epoch=2, pretrain_epochs=1, remove_all_beyond=4)
    assert m.steps_per_epoch == 10
    s = [m.scheduled(t) for t in range(40)]
    assert s[:15] == [0] * 15  # pretraining (10 steps), then 5 steps per token
    assert s[15:20] == [1] * 5 and s[20:25] == [2] * 5 and s[25:30] == [3] * 5
    assert all(v == math.inf for v in s[30:])  # s reached remove_all_beyond: the whole chain
    assert m.step_metrics(31) == {"train/cot_tokens_removed": 8.0}  # shown as the chain's length
    assert m.step_metrics(16) == {"train/cot_tokens_removed": 1.0}
    baseline = _si(epoch_examples=640, remove_per_epoch=0)[3]
    assert {baseline.scheduled(t) for t in range(1000)} == {0}
    assert (baseline.removal(np.arange(0, 64_000, 7)) == 0).all()  # no offsets either: plain CoT
    # an epoch of examples that is not a whole number of batches rounds up, as the reference's dataloader
    assert _si(epoch_examples=650, train={"batch_size": 64})[3].steps_per_epoch == 11


def test_offsets_follow_the_truncated_geometric_distribution_and_are_functions_of_the_index():
    n = 400_000
    idx = np.arange(n)
    for lam in (4.0, 0.5):
        o = removal_offsets(idx, lam, seed=0)
        p = (1 - math.exp(-lam)) * np.exp(-lam * np.arange(6))
        for k in range(6):
            observed = float(np.mean(o == k))
            assert abs(observed - p[k]) < 4 * math.sqrt(p[k] * (1 - p[k]) / n) + 1e-6, (lam, k, observed, p[k])
    assert abs(float(np.mean(removal_offsets(idx, 4.0, 0) == 0)) - 0.982) < 0.001  # the reference's λ=4 figure
    tiny = removal_offsets(idx[:50_000], 0.01, 0)  # a flat distribution: the tail piles up at the cap
    assert tiny.max() == MAX_OFFSET and np.mean(tiny == MAX_OFFSET) > 0.3
    assert (removal_offsets(idx, None, 0) == 0).all()
    again = removal_offsets(idx[1000:2000], 0.5, seed=0)
    assert (again == removal_offsets(idx, 0.5, seed=0)[1000:2000]).all()  # any slice, any process
    assert not (removal_offsets(idx[:2000], 0.5, seed=1) == removal_offsets(idx[:2000], 0.5, seed=0)).all()


def test_no_offset_during_pretraining_and_offsets_after_it():
    _, _, _, m = _si(epoch_examples=640, remove_per_epoch=2, pretrain_epochs=1, smoothing_lambda=0.5)
    assert (m.removal(np.arange(0, 10 * 64)) == 0).all()
    after = m.removal(np.arange(12 * 64, 13 * 64))  # s = 0 there, offsets only
    assert after.max() > 0 and (after == removal_offsets(np.arange(12 * 64, 13 * 64), 0.5, 0)).all()


# ---- optimizer resets ----

def _loop(m, task, tok, seed=0):
    torch.manual_seed(seed)
    cfg = m.cfg
    model = build_causal_lm(config_from_dict({"task": {"name": "multiplication"},
                                              "model": {"n_layer": 1, "d_model": 16, "n_head": 2}}).model,
                            len(tok), 64, tok.eos_token_id, CPU)
    return TrainLoop(model, m, cfg.train, CPU)


def _batch(m, task, tok, step, rows=8):
    bs = m.cfg.train.batch_size
    idx = np.arange(step * bs, step * bs + rows)
    return {k: torch.from_numpy(v) for k, v in m.encode(task.examples(int(idx[0]), int(idx[-1]) + 1), tok, 40,
                                                         indices=idx).items()}


def test_optimizer_is_reset_exactly_when_the_count_rises_and_a_resumed_loop_resets_alike():
    cfg, task, tok, m = _si(epoch_examples=64, remove_per_epoch=1, pretrain_epochs=2,
                            train={"batch_size": 16, "warmup_steps": 0})
    # 4 steps per epoch, one token per epoch after 8 steps of pretraining; 8 tokens gone at step 40
    rises = [t for t in range(1, 48) if m.scheduled(t) > m.scheduled(t - 1)]
    expected = [t for t in rises if m.scheduled(t - 1) < m.cot_tokens]
    assert expected == list(range(12, 41, 4)) and rises == expected + [44]  # none once the chain is gone
    whole = _loop(m, task, tok)
    states = []
    for step in range(48):
        whole.train_step([_batch(m, task, tok, step)])
        states.append(len(whole.optimizer.state))
    assert whole.resets == expected
    assert all(states[t - 1] == 0 for t in expected)  # the moments are gone right after a reset
    assert states[10] > 0

    first = _loop(m, task, tok)
    for step in range(22):  # stop between two resets
        first.train_step([_batch(m, task, tok, step)])
    saved = first.state_dict()
    second = _loop(m, task, tok, seed=123)
    second.load_state_dict(saved)
    for step in range(22, 48):
        second.train_step([_batch(m, task, tok, step)])
    assert first.resets + second.resets == expected
    for a, b in zip(whole.model.parameters(), second.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)  # the resumed run is the run it continues

    off = _si(epoch_examples=64, remove_per_epoch=1, reset_optimizer=False, train={"batch_size": 16})[3]
    loop = _loop(off, task, tok)
    for step in range(20):
        loop.train_step([_batch(off, task, tok, step)])
    assert loop.resets == []


def test_after_each_reset_the_learning_rate_ramps_up_again_over_reset_warmup_steps():
    cfg, task, tok, m = _si(epoch_examples=64, remove_per_epoch=1, pretrain_epochs=2, reset_warmup_steps=3,
                            train={"batch_size": 16, "warmup_steps": 0, "schedule": "constant", "lr": 1e-3})
    loop = _loop(m, task, tok)
    used = []
    for step in range(48):
        used.append(loop.lr)  # the rate this step trains with
        loop.train_step([_batch(m, task, tok, step)])
    resets = list(range(12, 41, 4))
    assert loop.resets == resets
    expected = [1e-3] * 48
    for r in resets:  # resets before step r: r, r+1 at 1/3 and 2/3, full again from r+2
        expected[r], expected[r + 1] = 1e-3 / 3, 2e-3 / 3
    assert used == pytest.approx(expected)
    assert [m.lr_scale(t) for t in (0, 11, 12, 13, 14, 44, 45)] == pytest.approx([1, 1, 1 / 3, 2 / 3, 1, 1, 1])
    assert _si(epoch_examples=64, remove_per_epoch=1, pretrain_epochs=2)[3].lr_scale(12) == 1.0  # default: none


# ---- the interface and the configuration ----

def test_every_method_subclasses_the_interface_and_declares_its_decoding():
    assert all(issubclass(cls, Method) for cls in METHODS.values())
    assert {n for n, cls in METHODS.items() if cls.decoding == "parallel"} == {"diffusion"}
    assert METHODS["internalize"].needs_cot and not METHODS["qa"].needs_cot


@pytest.mark.parametrize("overrides, message", [
    ({"remove_per_epoch": -1}, "method.remove_per_epoch"),
    ({"smoothing_lambda": 0}, "method.smoothing_lambda"),
    ({"smoothing_lambda": -2.0}, "method.smoothing_lambda"),
    ({"epoch_examples": 0}, "method.epoch_examples"),
    ({"side": "middle"}, "method.side"),
    ({"reset_warmup_steps": -1}, "method.reset_warmup_steps"),
])
def test_bad_internalization_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _si(**overrides)


def test_internalization_needs_a_task_with_a_chain_of_thought():
    with pytest.raises(ConfigError, match="profiles_qa.* has none"):
        config_from_dict({"task": {"name": "profiles_qa", "num_profiles": 20}, "method": {"name": "internalize"}})


def test_cli_rejects_bad_internalization_input_before_ray_starts():
    from conftest import cli_in_fresh_python

    for args in (["method.smoothing_lambda=0"], ["task.name=profiles_qa"], ["method.epoch_examples=0"]):
        out = cli_in_fresh_python("train", "jobs/si_mult_2x2.yaml", *args)
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and out.stdout.strip().endswith("NO_RAY")


def test_gsm8k_rows_lose_their_chain_too():
    d = ICOT / "gsm8k"
    _, task, tok, m = _si(task={"name": "gsm8k", "train_path": str(d / "train_no_aug.txt"),
                                "valid_path": str(d / "valid.txt"), "test_path": str(d / "test.txt"),
                                "vocab_size": 600},
                          epoch_examples=64, remove_per_epoch=64, smoothing_lambda=None)
    seq_len = sequence_length(task, m, tok)
    examples = task.examples(0, 3)
    later = m.encode(examples, tok, seq_len, indices=np.arange(640, 643))  # s = 10
    full = m.encode(examples, tok, seq_len)
    for i, e in enumerate(examples):
        cot_len = len(tok(f" {e.cot} ", add_special_tokens=False)["input_ids"])
        assert full["attention_mask"][i].sum() - later["attention_mask"][i].sum() == min(10, cot_len)
        assert _text(tok, {k: v[i] for k, v in later.items()}).endswith(f"#### {e.answer} {tok.eos_token}")


def test_gsm8k_job_trains_from_a_local_pretrained_model(tmp_path):
    """jobs/si_gsm8k.yaml with model.pretrained: the saved model and its tokenizer are what trains."""
    from reasonlab.config import load_config
    from reasonlab.data import encode_range
    from reasonlab.tokenizer import tokenizer_from_files
    from reasonlab.train import prepare_run

    d = ICOT / "gsm8k"
    paths = [f"task.train_path={d / 'train_no_aug.txt'}", f"task.valid_path={d / 'valid.txt'}",
             f"task.test_path={d / 'test.txt'}", "task.vocab_size=600"]
    cfg = load_config(REPO_JOBS / "si_gsm8k.yaml", paths)
    task = make_task(cfg.task)
    tok = build_tokenizer(task)
    source = build_causal_lm(config_from_dict({"task": {"name": "multiplication"},
                                               "model": {"n_layer": 1, "d_model": 32, "n_head": 2}}).model,
                             len(tok), 1024, tok.eos_token_id, CPU)
    source.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = load_config(REPO_JOBS / "si_gsm8k.yaml", [*paths, f"model.pretrained={tmp_path}", "train.batch_size=4"])
    spec = prepare_run(cfg)
    loaded = tokenizer_from_files(spec["tokenizer"])
    assert loaded.get_vocab() == tok.get_vocab()  # the model's own tokenizer, not a new one
    m = make_method(cfg.method, cfg)
    m.setup(task, loaded)
    model = m.build_model(cfg.model, loaded, spec["max_len"], CPU)
    assert model.config.n_layer == 1
    loop = TrainLoop(model, m, cfg.train, CPU)
    first = encode_range(spec, 0, 4)
    late = encode_range(spec, 4 * 9000, 4 * 9001)  # step 9000: s = 9000 // 218 = 41 >= 39, the whole chain
    assert first["attention_mask"].sum() > late["attention_mask"].sum()
    for row in range(4):
        ids = late["input_ids"][row][late["attention_mask"][row] == 1].tolist()
        first_eos = ids.index(loaded.eos_token_id)
        assert ids[first_eos + 1] == loaded.eos_token_id  # `<eos> <eos> #### answer <eos>`: no chain
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = loop.train_step([{k: torch.from_numpy(v) for k, v in late.items()}])
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
