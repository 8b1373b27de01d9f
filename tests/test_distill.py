"""ICoT-KD in the core: the per-example diagonal of teacher states, the hand-over to the student (it reads
exactly the frozen teacher's states), substitution in the prompt's forward when decoding, strict saving and
loading, and the three stages training through the core loop, on GPT-2 and Llama."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ICOT
from reasonlab.config import ConfigError, config_from_dict
from reasonlab.loop import TrainLoop
from reasonlab.methods import make_method, sequence_length
from reasonlab.methods.distill import (PARTS_FILE, MindReadingStudent, diagonal_positions, eos_positions,
                                       teacher_states)
from reasonlab.models.blocks import block_inputs, decoder_blocks, take_at
from reasonlab.runref import RunRef
from reasonlab.runs import LoadedRun, load_run_dir
from reasonlab.tasks import make_task
from reasonlab.tokenizer import build_tokenizer

CPU = torch.device("cpu")
MULT = {"name": "multiplication", "a_digits": 2, "b_digits": 2}
GSM8K = {"name": "gsm8k", "train_path": str(ICOT / "gsm8k" / "train_no_aug.txt"),
         "valid_path": str(ICOT / "gsm8k" / "valid.txt"), "test_path": str(ICOT / "gsm8k" / "test.txt")}


def _stage(method: dict, task=None, arch="gpt2", **train):
    cfg = config_from_dict({"task": task or MULT, "method": method,
                            "model": {"arch": arch, "n_layer": 3, "d_model": 32, "n_head": 2},
                            "train": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 0, **train}})
    task = make_task(cfg.task)
    return cfg, task


def _loaded(cfg, task, tokenizer, model) -> LoadedRun:
    method = make_method(cfg.method, cfg)
    method.setup(task, tokenizer)
    return LoadedRun(cfg, task, method, tokenizer, model.eval())


def _train(cfg, task, tokenizer, inputs=None, steps=0, seed=0):
    """A stage's model built with its inputs and trained `steps` steps in the core loop; its losses."""
    torch.manual_seed(seed)
    method = make_method(cfg.method, cfg)
    method.setup(task, tokenizer)
    seq_len = sequence_length(task, method, tokenizer)
    model = method.build_model(cfg.model, tokenizer, 64, CPU, inputs)
    loop = TrainLoop(model, method, cfg.train, CPU)
    losses = []
    for step in range(steps):
        n = cfg.train.batch_size
        rows = method.encode(task.examples(step * n, (step + 1) * n), tokenizer, seq_len)
        loss, _ = loop.train_step([{k: torch.from_numpy(v) for k, v in rows.items()}])
        losses.append(float(loss))
    return method, model, losses


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def teacher(request):
    cfg, task = _stage({"name": "cot"}, arch=request.param)
    tok = build_tokenizer(task)
    _, model, _ = _train(cfg, task, tok, steps=3)
    return _loaded(cfg, task, tok, model)


def test_diagonal_stride_is_computed_for_every_example():
    # the reference's bug: one stride (row 0's) for the whole batch, so row 1 stops short and row 2 is clamped
    first = torch.tensor([10, 10, 10])
    second = torch.tensor([21, 43, 15])
    got = diagonal_positions(first, second, 12)
    for row in range(3):
        stride = (int(second[row]) - 10) / 11
        expected = [min(round(10 + layer * stride), int(second[row])) for layer in range(12)]
        assert got[row].tolist() == expected
        assert got[row, 0] == 10 and got[row, -1] == second[row]  # layer 0 reads e1, the last layer e2


def test_teacher_eos_columns_follow_each_rows_chain_length():
    cfg, task = _stage({"name": "kd_student", "teacher": "t"}, task=GSM8K)
    tok = build_tokenizer(task)
    method = make_method(cfg.method, cfg)
    method.setup(task, tok)
    examples = task.examples(0, 6)
    rows = method.encode(examples, tok, sequence_length(task, method, tok))
    eos = tok.eos_token
    lengths = set()
    for i, e in enumerate(examples):
        prompt = len(tok(method.prompt_text(e, eos), add_special_tokens=False)["input_ids"])
        chain = len(tok(f" {e.cot} {eos}", add_special_tokens=False)["input_ids"])
        assert rows["teacher_eos"][i].tolist() == [prompt - 1, prompt - 1 + chain]
        assert rows["at"][i] == prompt - 1  # the student's row: the same prompt, its EOS
        lengths.add(chain)
    assert len(lengths) > 1  # GSM8K chains differ in length: the per-example diagonal matters


def test_the_student_reads_exactly_the_frozen_teachers_diagonal_states(teacher):
    cfg, task = _stage({"name": "kd_student", "teacher": "t"}, arch=teacher.cfg.model.arch)
    method, student, _ = _train(cfg, task, teacher.tokenizer, {"teacher": teacher})
    examples = task.examples(100, 105)
    batch = {k: torch.from_numpy(v) for k, v in
             method.encode(examples, teacher.tokenizer, sequence_length(task, method, teacher.tokenizer)).items()}
    # direct computation: transformers' hidden_states[l] is the input of block l
    with torch.no_grad():
        hidden = teacher.model(input_ids=batch["teacher_ids"], attention_mask=batch["teacher_mask"],
                               output_hidden_states=True).hidden_states
    layers = len(decoder_blocks(teacher.model))
    e1, e2 = batch["teacher_eos"][:, 0], batch["teacher_eos"][:, 1]
    expected = torch.stack([torch.nn.functional.layer_norm(
        hidden[layer][torch.arange(5), torch.round(e1 + layer * (e2 - e1) / (layers - 1)).long()], (32,))
        for layer in range(layers)], 1)
    states = method.teacher_batch_states(batch)
    torch.testing.assert_close(states, expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in method.teacher.parameters())  # frozen, outside the trained module
    assert not any(p is q for p in student.parameters() for q in teacher.model.parameters())

    # and what enters the student's block l at the prompt's EOS is reader_l(teacher state l)
    entering = {}
    with torch.no_grad(), student.substitution(states, batch["at"]), \
            block_inputs(student.lm, lambda layer, h: entering.__setitem__(layer, take_at(h, batch["at"]))):
        student.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for layer, reader in enumerate(student.readers):
            torch.testing.assert_close(entering[layer], reader(states[:, layer]))


def test_decoding_substitutes_in_the_prompts_forward_like_training(teacher):
    cfg, task = _stage({"name": "kd_student", "teacher": "t"}, arch=teacher.cfg.model.arch)
    method, student, _ = _train(cfg, task, teacher.tokenizer, {"teacher": teacher}, steps=2)
    tok = teacher.tokenizer
    examples = task.examples(7, 8)
    batch = {k: torch.from_numpy(v) for k, v in
             method.encode(examples, tok, sequence_length(task, method, tok)).items()}
    width = int(batch["attention_mask"].sum())
    with torch.no_grad():
        logits = method.logits(student, batch)  # teacher-forced, as in training
    generated = method.generate_text(student, tok, examples, max_new_tokens=width, seq_len=None, device=CPU,
                                     generator=torch.Generator())
    first = tok(generated, add_special_tokens=False)["input_ids"][0][0]
    assert first == int(logits[0, batch["at"][0]].argmax())
    # without the substitution the student would answer something else from the same prompt
    plain = method.prompt_batch(examples, tok, CPU)
    with torch.no_grad():
        unsubstituted = student.lm(**plain).logits[0, -1]
        assert not torch.allclose(unsubstituted, logits[0, batch["at"][0]])


def test_three_stages_train_and_hand_over_through_saved_runs(teacher, tmp_path):
    arch, tok = teacher.cfg.model.arch, teacher.tokenizer
    cfg, task = _stage({"name": "kd_student", "teacher": "t"}, arch=arch)
    s_method, student, s_losses = _train(cfg, task, tok, {"teacher": teacher}, steps=25)
    assert s_losses[-1] < s_losses[0]
    saved = _save_run(tmp_path / "student", cfg, s_method, student, tok)
    student_run = load_run_dir(saved, CPU)  # rebuilt from config.yaml and model/, strictly
    assert isinstance(student_run.model, MindReadingStudent)
    for a, b in zip(student.state_dict().values(), student_run.model.state_dict().values()):
        torch.testing.assert_close(a, b)

    cfg, task = _stage({"name": "kd_emulator", "teacher": "t", "student": "s"}, arch=arch)
    e_method, emulator, e_losses = _train(cfg, task, tok, {"teacher": teacher, "student": student_run}, steps=25)
    assert np.mean(e_losses[-5:]) < np.mean(e_losses[:5])  # the MSE to the teacher's states falls
    emulator_run = load_run_dir(_save_run(tmp_path / "emulator", cfg, e_method, emulator, tok), CPU)

    cfg, task = _stage({"name": "kd_coupled", "student": "s", "emulator": "e"}, arch=arch)
    c_method, coupled, c_losses = _train(cfg, task, tok, {"student": student_run, "emulator": emulator_run},
                                         steps=3)
    assert all(np.isfinite(c_losses))
    texts = c_method.generate_text(coupled, tok, task.examples(0, 3), max_new_tokens=12, seq_len=None, device=CPU,
                                   generator=torch.Generator())
    assert len(texts) == 3
    coupled_run = load_run_dir(_save_run(tmp_path / "coupled", cfg, c_method, coupled, tok), CPU)
    again = c_method.generate_text(coupled_run.model, tok, task.examples(0, 3), max_new_tokens=12, seq_len=None,
                                   device=CPU, generator=torch.Generator())
    assert again == texts


def test_fix_emulator_trains_the_student_alone(teacher, tmp_path):
    arch, tok = teacher.cfg.model.arch, teacher.tokenizer
    cfg, task = _stage({"name": "kd_student", "teacher": "t"}, arch=arch)
    method, student, _ = _train(cfg, task, tok, {"teacher": teacher})
    student_run = _loaded(cfg, task, tok, student)
    readers = {k: v.clone() for k, v in student.readers.state_dict().items()}
    cfg, task = _stage({"name": "kd_emulator", "teacher": "t", "student": "s"}, arch=arch)
    _, emulator, _ = _train(cfg, task, tok, {"teacher": teacher, "student": student_run})
    before = {k: v.clone() for k, v in emulator.state_dict().items()}
    cfg, task = _stage({"name": "kd_coupled", "student": "s", "emulator": "e", "fix_emulator": True}, arch=arch)
    _, coupled, _ = _train(cfg, task, tok, {"student": student_run, "emulator": _loaded(cfg, task, tok, emulator)},
                           steps=2)
    assert all(torch.equal(before[k], v) for k, v in coupled.emulator.state_dict().items())
    assert not all(torch.equal(readers[k], v) for k, v in coupled.student.readers.state_dict().items())


def test_loading_is_strict(teacher, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg, task = _stage({"name": "kd_student", "teacher": "t"}, arch=teacher.cfg.model.arch)
    method, student, _ = _train(cfg, task, teacher.tokenizer, {"teacher": teacher})
    saved = _save_run(tmp_path / "s", cfg, method, student, teacher.tokenizer)
    parts = load_file(str(saved / "model" / PARTS_FILE))
    parts.pop(next(iter(parts)))
    save_file(parts, str(saved / "model" / PARTS_FILE))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_run_dir(saved, CPU)


def test_teacher_and_student_must_have_as_many_layers(teacher):
    cfg, task = _stage({"name": "kd_student", "teacher": "t"}, arch=teacher.cfg.model.arch)
    cfg = cfg.replace(model={"n_layer": 2})
    with pytest.raises(ConfigError, match="model.n_layer"):
        _train(cfg, task, teacher.tokenizer, {"teacher": teacher})


@pytest.mark.parametrize("method, message", [
    ({"name": "kd_student"}, "method.teacher: required"),
    ({"name": "kd_emulator", "teacher": "t"}, "method.student: required"),
    ({"name": "kd_coupled", "student": "s"}, "method.emulator: required"),
    ({"name": "kd_student", "teacher": "bad name!"}, "method.teacher: expected a run id or name"),
])
def test_stage_inputs_are_checked(method, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"task": MULT, "method": method})


def test_run_references_parse_and_round_trip_through_the_config():
    cfg = config_from_dict({"task": MULT, "method": {"name": "kd_student", "teacher": "my-teacher@2000"}})
    assert cfg.method.teacher == RunRef("my-teacher", 2000)
    assert cfg.run_refs() == {"teacher": RunRef("my-teacher", 2000)}
    assert cfg.to_dict()["method"]["teacher"] == "my-teacher@2000"
    assert config_from_dict(cfg.to_dict()).method.teacher == cfg.method.teacher
    assert cfg.flat()["method.teacher"] == "my-teacher@2000"


def test_teacher_states_read_what_enters_each_block(teacher):
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    positions = torch.tensor([[0, 2, 4]])
    states = teacher_states(teacher.model, ids, torch.ones_like(ids), positions)
    with torch.no_grad():
        hidden = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(3):
        torch.testing.assert_close(states[0, layer],
                                   torch.nn.functional.layer_norm(hidden[layer][0, positions[0, layer]], (32,)))


def test_eos_positions():
    ids = torch.tensor([[5, 0, 6, 7, 0, 8, 0, 0], [5, 6, 0, 0, 9, 9, 0, 0]])
    assert eos_positions(ids, 0, 2).tolist() == [[1, 4], [2, 3]]


def _save_run(directory, cfg, method, model, tokenizer):
    """A finished run's files, as tracking.download_run lays them out."""
    (directory / "model").mkdir(parents=True)
    (directory / "config.yaml").write_text(cfg.to_yaml())
    method.save(model, str(directory / "model"))
    tokenizer.save_pretrained(str(directory / "model"))
    return directory
