"""The core without Ray: tokenizer, sequences and loss masks, models, decoding and exact match."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ICOT
from reasonlab.config import config_from_dict
from reasonlab.evaluate import evaluate
from reasonlab.methods import IGNORE, make_method, sequence_length, target_length
from reasonlab.models import build_causal_lm, count_parameters
from reasonlab.tasks import make_task
from reasonlab.tokenizer import build_tokenizer, load_tokenizer, tokenizer_files, tokenizer_from_files
from reasonlab.loop import TrainLoop, lr_factor

CPU = torch.device("cpu")


def _cfg(**sections):
    data = {"task": {"name": "multiplication", "a_digits": 2, "b_digits": 2}}
    data.update(sections)
    return config_from_dict(data)


@pytest.fixture(scope="module")
def mult():
    cfg = _cfg()
    task = make_task(cfg.task)
    return cfg, task, build_tokenizer(task)


def test_tokenizer_round_trips_through_save_pretrained(mult, tmp_path):
    _, task, tok = mult
    line = task.heldout("test")[0].line()
    text = line.replace("||", " <|endoftext|> ")
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(tok(text)["input_ids"]) == " ".join(text.split())
    assert tokenizer_from_files(tokenizer_files(tok)).get_vocab() == tok.get_vocab()
    assert tok.unk_token_id not in tok(text)["input_ids"]  # the vocabulary covers the format
    assert tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"


def test_gsm8k_tokenizer_is_a_bpe_with_single_digits():
    d = ICOT / "gsm8k"
    cfg = config_from_dict({"task": {"name": "gsm8k", "train_path": str(d / "train_no_aug.txt"),
                                     "valid_path": str(d / "valid.txt"), "test_path": str(d / "test.txt"),
                                     "vocab_size": 1000}})
    task = make_task(cfg.task)
    tok = build_tokenizer(task)
    assert len(tok) == 1000
    example = task.heldout("test")[0]
    ids = tok(example.line())["input_ids"]
    assert tok.decode(ids) == example.line()
    assert "16" not in tok.convert_ids_to_tokens(ids) and "6" in tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("method_name, n_eos", [("cot", 2), ("nocot", 1)])
def test_loss_covers_exactly_the_target(mult, method_name, n_eos):
    _, task, tok = mult
    method = make_method(config_from_dict({"task": {"name": "multiplication"}, "method": {"name": method_name}}).method)
    example = task.examples(0, 1)[0]
    seq_len = sequence_length(task, method, tok)
    batch = method.encode([example], tok, seq_len + 3)  # 3 columns of padding
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    eos = tok.eos_token_id
    first_eos = int(np.argmax(ids == eos))
    assert tok.decode(ids[:first_eos]) == example.prompt
    assert (labels[: first_eos + 1] == IGNORE).all()  # prompt and its EOS carry no loss
    target = labels[first_eos + 1: seq_len]
    assert (target != IGNORE).all() and (labels[seq_len:] == IGNORE).all() and mask.sum() == seq_len
    decoded = tok.decode(target)
    expected = (f"{example.cot} <|endoftext|> " if method_name == "cot" else "") + f"#### {example.answer} <|endoftext|>"
    assert decoded == expected
    assert (target == eos).sum() == n_eos == method.eos_in_target


def test_answer_extraction():
    cot, nocot = make_method(_cfg().method), make_method(_cfg(method={"name": "nocot"}).method)
    eos = "<|endoftext|>"
    assert cot.answer(f"1 2 + 3 {eos} #### 4 5 {eos} {eos}", eos) == "4 5"
    assert cot.answer(f"1 2 + 3 {eos} 4 5 {eos}", eos) == ""  # no answer marker
    assert cot.answer(f"1 #### 9 {eos} #### 4 5 {eos}", eos) == "4 5"  # the answer comes after the CoT
    assert nocot.answer(f"#### 1,234 {eos} #### 9", eos) == "1234"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_models_build_from_config_with_sdpa(arch):
    cfg = _cfg(model={"arch": arch, "n_layer": 2, "d_model": 32, "n_head": 2})
    model = build_causal_lm(cfg.model, 20, 48, 0, CPU)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    out = model(input_ids=torch.zeros(2, 10, dtype=torch.long))
    assert out.logits.shape == (2, 10, 20)


def test_pretrained_model_loads_from_a_local_path(mult, tmp_path):
    cfg, task, tok = mult
    source = build_causal_lm(_cfg(model={"n_layer": 1, "d_model": 32, "n_head": 2}).model, len(tok), 64,
                             tok.eos_token_id, CPU)
    source.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = _cfg(model={"pretrained": str(tmp_path)})
    loaded = build_causal_lm(cfg.model, len(tok), 64, tok.eos_token_id, CPU)
    assert loaded.config.n_layer == 1  # the saved model, not the config's 4 layers
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_schedule_warms_up_then_decays():
    cfg = _cfg(train={"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}).train
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    constant = _cfg(train={"schedule": "constant", "warmup_steps": 0}).train
    assert lr_factor(500, constant) == 1.0


def test_a_small_model_learns_two_digit_multiplication_with_cot(mult):
    """The whole core path: generated data → masked loss → AdamW → greedy decoding → exact match."""
    cfg, task, tok = mult
    torch.manual_seed(0)
    cfg = _cfg(model={"n_layer": 4, "d_model": 64, "n_head": 4},
               train={"lr": 6e-3, "max_steps": 700, "warmup_steps": 30})  # 96.7% here, 91.3% at step 600
    method = make_method(cfg.method)
    seq_len = sequence_length(task, method, tok)
    model = build_causal_lm(cfg.model, len(tok), seq_len, tok.eos_token_id, CPU)
    loop = TrainLoop(model, method, cfg.train, CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only waits on a second thread
    try:
        for step in range(cfg.train.max_steps):
            batch = {k: torch.from_numpy(v) for k, v in method.encode(task.examples(step * 64, step * 64 + 64),
                                                                       tok, seq_len).items()}
            loop.train_step([batch])
        result = evaluate(model, tok, method, task.heldout("test")[:300], batch_size=100,
                          max_new_tokens=target_length(task, method, tok) + 4, device=CPU)
    finally:
        torch.set_num_threads(threads)
    assert result.accuracy >= 0.9, result.predictions[:3]
    assert result.examples_per_sec > 0 and result.num_examples == 300
    right = [p for p in result.predictions if p["correct"]]
    assert right and all(p["predicted"] == p["answer"] for p in right)


def test_a_first_batch_that_keeps_a_worker_waiting_is_said_once_and_a_prompt_one_is_not():
    import time

    from reasonlab.train import _first_fetched_ahead

    def stream(delay):
        time.sleep(delay)
        yield from range(3)

    lines = []
    assert list(_first_fetched_ahead(stream(0.5), lambda *a, **k: lines.append(a[0]), patience=0.1)) == [0, 1, 2]
    assert len(lines) == 1 and lines[0].startswith("no training batch from Ray Data after 0.1 s")
    lines.clear()
    assert list(_first_fetched_ahead(stream(0.0), lambda *a, **k: lines.append(a[0]), patience=0.3)) == [0, 1, 2]
    time.sleep(0.5)  # nothing comes later either
    assert lines == []


def test_the_first_batch_is_fetched_before_it_is_asked_for_and_its_error_reaches_the_asker():
    import threading

    from reasonlab.train import _first_fetched_ahead

    fetched = threading.Event()

    def stream():
        fetched.set()
        yield from range(3)

    batches = _first_fetched_ahead(stream(), print)
    assert fetched.wait(5)  # nobody has asked yet
    assert list(batches) == [0, 1, 2]

    def broken():
        raise OSError("no data")
        yield

    batches = _first_fetched_ahead(broken(), print)
    with pytest.raises(OSError, match="no data"):
        next(batches)
