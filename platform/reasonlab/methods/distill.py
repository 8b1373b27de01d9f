"""Implicit chain of thought by knowledge distillation (ICoT-KD, Deng et al. 2023; reference/icot.md §2):
an explicit-CoT teacher (a finished `cot` run) thinks vertically instead of horizontally in three stages.

  kd_student   mind-reading student: reads ` prompt <eos>`; before each block l the hidden state at the
               prompt's EOS is replaced by MLP_l(teacher state l), and it learns ` #### answer <eos>`
  kd_emulator  thought emulator: reads ` prompt <eos>` alone and predicts the teacher states (MSE), its own
               predictions fed forward through an LSTM across layers with attention over earlier layers
  kd_coupled   emulator → student, trained end to end on the answer loss (`fix_emulator` freezes it)

Teacher state l is the hidden state entering the teacher's block l (embeddings for l = 0) on the diagonal
of (layer × chain position): t_l = round(e1 + l·(e2 − e1)/(L − 1)), at most e2, where e1 and e2 are the
example's EOS after the prompt and after the chain. The stride is computed for every example (the
reference computes it once per batch, which corrupts GSM8K targets), and states are LayerNorm-ed
without affine parameters. Frozen inputs (teacher, and the student the emulator is evaluated with) live on
the method, outside the trained module, so DDP, the optimizer, checkpoints and the saved model only see
what is trained. Every stage loads its inputs strictly (the reference falls back to non-strict loading),
and clipping is the core loop's, which clips (the reference's did not until a late fix).

Models are read and rewritten through the one per-architecture block accessor (models/blocks.py), so
GPT-2 and Llama both work and no forward pass is copied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from reasonlab.errors import ConfigError
from reasonlab.methods.autoregressive import AutoregressiveMethod, ExplicitCoT, NoCoT, decode
from reasonlab.methods.base import MethodParams
from reasonlab.models.blocks import block_inputs, decoder_blocks, replace_at, take_at
from reasonlab.runref import RunRef
from reasonlab.tasks import Example

PARTS_FILE = "kd_parts.safetensors"  # the modules beside the language model
SHAPE_FILE = "kd_shape.json"  # what rebuilding them needs


def diagonal_positions(first: torch.Tensor, second: torch.Tensor, layers: int) -> torch.Tensor:
    """[batch, layers]: t_l = round(first + l·(second − first)/(layers − 1)), clamped to `second`, with
    each example's own stride."""
    stride = (second - first).double() / max(layers - 1, 1)
    steps = torch.arange(layers, device=first.device, dtype=torch.double)
    return torch.minimum(torch.round(first[:, None] + steps * stride[:, None]).long(), second[:, None])


def eos_positions(input_ids: torch.Tensor, eos_id: int, count: int) -> torch.Tensor:
    """[batch, count]: the columns of each row's first `count` EOS tokens (every row has them)."""
    is_eos = (input_ids == eos_id).long()
    order = torch.cumsum(is_eos, 1)
    return torch.stack([((order == k + 1) & (is_eos == 1)).long().argmax(1) for k in range(count)], 1)


@torch.no_grad()
def teacher_states(teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """[batch, layers, d]: the state entering teacher block l at `positions[:, l]`, LayerNorm-ed without
    affine parameters."""
    taken: dict[int, torch.Tensor] = {}

    def read(layer: int, hidden: torch.Tensor) -> None:
        taken[layer] = take_at(hidden, positions[:, layer])

    with block_inputs(teacher, read):
        teacher.base_model(input_ids=input_ids, attention_mask=attention_mask)
    states = torch.stack([taken[i] for i in range(len(taken))], 1).float()
    return F.layer_norm(states, states.shape[-1:])


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, 4 * d_out), nn.ReLU(), nn.Linear(4 * d_out, d_out))


def _hidden_size(lm: nn.Module) -> int:
    return lm.get_input_embeddings().weight.shape[1]


class _PartsModule(nn.Module):
    """A causal LM (`self.lm`, saved with save_pretrained) plus modules saved beside it; loading is strict."""

    shape: dict

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.lm.save_pretrained(directory)
        parts = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("lm.")}
        save_file(parts, str(directory / PARTS_FILE))
        (directory / SHAPE_FILE).write_text(json.dumps({"kind": type(self).__name__, **self.shape}))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | None = None):
        from transformers import AutoModelForCausalLM

        directory = Path(directory)
        shape_file = directory / SHAPE_FILE
        if not shape_file.is_file():
            raise ValueError(f"{directory}: no {SHAPE_FILE}: not a saved {cls.__name__}")
        shape = json.loads(shape_file.read_text())
        kind = shape.pop("kind")
        if kind != cls.__name__:
            raise ValueError(f"{directory}: holds a saved {kind}, not a {cls.__name__}")
        module = cls(AutoModelForCausalLM.from_pretrained(directory), **shape)
        # strict: a part missing from the file, or one the file has and the module lacks, is an error
        module.load_state_dict({**{f"lm.{k}": v for k, v in module.lm.state_dict().items()},
                                **load_file(str(directory / PARTS_FILE))}, strict=True)
        return module.to(device) if device is not None else module


class MindReadingStudent(_PartsModule):
    """A causal LM whose state entering block l at the prompt's EOS is MLP_l(a teacher state)."""

    def __init__(self, lm: nn.Module, teacher_dim: int) -> None:
        super().__init__()
        self.lm = lm
        self.shape = {"teacher_dim": teacher_dim}
        d = _hidden_size(lm)
        self.readers = nn.ModuleList(_mlp(teacher_dim, d) for _ in decoder_blocks(lm))

    @property
    def num_layers(self) -> int:
        return len(self.readers)

    def substitution(self, states: torch.Tensor, at: torch.Tensor):
        """A context in which the LM's forward reads `states` ([batch, layers, teacher_dim]) at `at`."""
        read = [reader(states[:, i]) for i, reader in enumerate(self.readers)]
        return block_inputs(self.lm, lambda layer, hidden: replace_at(hidden, at, read[layer]))

    def forward(self, input_ids, attention_mask, states, at):
        with self.substitution(states, at):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


class ThoughtEmulator(_PartsModule):
    """A causal LM that predicts, at the prompt's EOS, the teacher state entering each block: ẑ_l =
    MLP_l([z_l; m]) from its own state z_l and a mixture embedding m; an LSTM across layers (with
    dot-product attention over the keys of earlier layers) turns ẑ_l into the state that block l reads."""

    def __init__(self, lm: nn.Module, mixture_size: int = 1, temperature: float = 0.05) -> None:
        super().__init__()
        self.lm = lm
        self.shape = {"mixture_size": mixture_size, "temperature": temperature}
        d = _hidden_size(lm)
        self.mlps = nn.ModuleList(_mlp(2 * d, d) for _ in decoder_blocks(lm))
        self.mixture = nn.Embedding(mixture_size, d)
        self.rnn = nn.LSTM(input_size=d, hidden_size=d, num_layers=1)
        self.key_proj, self.query_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(2 * d, d)

    @property
    def num_layers(self) -> int:
        return len(self.mlps)

    def forward(self, input_ids, attention_mask, at, position_ids=None) -> torch.Tensor:
        """[batch, layers, d]: the predicted teacher states (ẑ_l)."""
        predicted: list[torch.Tensor] = []
        carry: dict = {"rnn": None, "keys": None, "context": None}

        def emulate(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            z = take_at(hidden, at)
            weight = self.mixture.weight
            if weight.shape[0] == 1:
                mixture = weight.expand(z.shape[0], -1)
            else:
                mixture = torch.softmax(z @ weight.T / self.shape["temperature"], -1) @ weight
            guess = self.mlps[layer](torch.cat([z, mixture.to(z.dtype)], -1))
            predicted.append(guess)
            context = carry["context"] if carry["context"] is not None else torch.zeros_like(guess)
            out, carry["rnn"] = self.rnn((guess + context)[None], carry["rnn"])
            out = out[0]
            key = self.key_proj(out)
            if carry["keys"] is not None:  # attend over the earlier layers' keys
                weights = torch.softmax(torch.bmm(carry["keys"], self.query_proj(out)[:, :, None]), 1)
                context = torch.bmm(weights.transpose(1, 2), carry["keys"])[:, 0]
                carry["keys"] = torch.cat([carry["keys"], key[:, None]], 1)
            else:
                carry["keys"] = key[:, None]
            carry["context"] = context
            return replace_at(hidden, at, self.out_proj(torch.cat([out, context], -1)))

        with block_inputs(self.lm, emulate):
            self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return torch.stack(predicted, 1)


class CoupledThoughts(nn.Module):
    """Emulator → student: the student reads the emulator's predicted states; trained end to end."""

    def __init__(self, emulator: ThoughtEmulator, student: MindReadingStudent) -> None:
        super().__init__()
        self.emulator, self.student = emulator, student

    def get_input_embeddings(self) -> nn.Module:
        return self.student.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.student.get_output_embeddings()

    def forward(self, input_ids, attention_mask, at):
        return self.student(input_ids, attention_mask, self.emulator(input_ids, attention_mask, at), at)

    def save_pretrained(self, directory: str | Path) -> None:
        self.emulator.save_pretrained(Path(directory) / "emulator")
        self.student.save_pretrained(Path(directory) / "student")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | None = None) -> "CoupledThoughts":
        directory = Path(directory)
        return cls(ThoughtEmulator.from_pretrained(directory / "emulator", device),
                   MindReadingStudent.from_pretrained(directory / "student", device))


# ----------------------------------------------------------------------------------------------------
# Methods


@dataclass
class StudentParams(MethodParams):
    name: str = "kd_student"
    teacher: Optional[RunRef] = None  # a finished `cot` run (or, in a staged job, its stage)

    def check(self) -> None:
        _require(self, "teacher")


@dataclass
class EmulatorParams(MethodParams):
    name: str = "kd_emulator"
    teacher: Optional[RunRef] = None  # whose states it learns to predict
    student: Optional[RunRef] = None  # a kd_student run: evaluation answers through it, frozen
    mixture_size: int = 1  # 1: one learned mixture vector (the reference's setting)
    softmax_temperature: float = 0.05  # of the mixture weights when mixture_size > 1

    def check(self) -> None:
        _require(self, "teacher", "student")
        if self.mixture_size < 1:
            raise ConfigError(f"method.mixture_size: expected a value >= 1, got {self.mixture_size}")
        if not self.softmax_temperature > 0:
            raise ConfigError(f"method.softmax_temperature: expected a value > 0, got {self.softmax_temperature}")


@dataclass
class CoupledParams(MethodParams):
    name: str = "kd_coupled"
    student: Optional[RunRef] = None  # a kd_student run
    emulator: Optional[RunRef] = None  # a kd_emulator run
    fix_emulator: bool = False  # train the student alone on the emulator's predictions

    def check(self) -> None:
        _require(self, "student", "emulator")


def _require(params: MethodParams, *keys: str) -> None:
    for key in keys:
        if getattr(params, key) is None:
            raise ConfigError(f"method.{key}: required for {params.name}; expected a finished run's id or name "
                              f"(or, in a staged job, a stage's name)")


class _DistillMethod(AutoregressiveMethod):
    """What the three stages share: rows ` prompt <eos> #### answer <eos>` (the no-CoT target), the
    prompt's EOS column `at`, and answers decoded with states substituted in the prompt's forward."""

    needs_cot = True  # the teacher reads the chain
    teacher_forced = False  # a target's loss needs the thought states, not just the prompt
    packs = False  # a row is one example: its teacher row and its EOS column go with it
    eos_in_target = 1
    model_kind = "ICoT-KD"
    _target = NoCoT()

    def target_text(self, example: Example, eos: str) -> str:
        return self._target.target_text(example, eos)

    def encode(self, examples: list[Example], tokenizer, seq_len: int, indices=None) -> dict[str, np.ndarray]:
        rows = self.rows(self.token_ids(examples, tokenizer), tokenizer.eos_token_id, seq_len)
        rows["at"] = np.argmax(rows["input_ids"] == tokenizer.eos_token_id, axis=1).astype(np.int64)
        return rows

    def _inputs(self, inputs: dict | None, *names: str) -> list:
        if not inputs or any(name not in inputs for name in names):
            raise ValueError(f"{self.name} trains from finished runs {names}; pass them as `inputs`")
        return [inputs[name] for name in names]

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        return model.eval().requires_grad_(False)

    def thought_states(self, model, examples: list[Example], tokenizer, prompts: dict, at: torch.Tensor):
        """[batch, layers, d] states the student reads for these examples (teacher or emulator)."""
        raise NotImplementedError

    def student_of(self, model) -> MindReadingStudent:
        raise NotImplementedError

    def generate_text(self, model, tokenizer, examples: list[Example], *, max_new_tokens: int, seq_len: int | None,
                      device: torch.device, generator: torch.Generator, sample: bool = False,
                      steps: int | None = None, decoder: str = "dynamic") -> list[str]:
        """The student decodes from the left-padded prompts; the states are substituted at the prompt's
        EOS (the last column) during the prompt's forward only, as the reference does."""
        enc = self.prompt_batch(examples, tokenizer, device)
        at = torch.full((len(examples),), enc["input_ids"].shape[1] - 1, device=device)
        states = self.thought_states(model, examples, tokenizer, enc, at)
        student = self.student_of(model)
        out = decode(student.lm, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                     eos_id=tokenizer.eos_token_id, stop_after=self.eos_in_target,
                     generator=generator if sample else None, decoder=decoder,
                     prefill=student.substitution(states, at))
        return tokenizer.batch_decode(out.tolist(), skip_special_tokens=False)


class _ReadsTeacher(_DistillMethod):
    """Stages that read the frozen teacher's diagonal states: rows also carry the teacher's row (with its
    chain) and its two EOS columns."""

    teacher: nn.Module | None = None

    def setup(self, task, tokenizer) -> None:
        self._cot = ExplicitCoT()
        self._teacher_len = max(len(ids) for ids in self._cot.token_ids(task.length_probe(tokenizer), tokenizer))

    def encode(self, examples: list[Example], tokenizer, seq_len: int, indices=None) -> dict[str, np.ndarray]:
        rows = super().encode(examples, tokenizer, seq_len, indices)
        eos = tokenizer.eos_token_id
        taught = self.rows(self._cot.token_ids(examples, tokenizer), eos, self._teacher_len)
        rows["teacher_ids"], rows["teacher_mask"] = taught["input_ids"], taught["attention_mask"]
        rows["teacher_eos"] = eos_positions(torch.from_numpy(taught["input_ids"]), eos, 2).numpy()
        return rows

    def set_teacher(self, teacher: nn.Module, layers: int, what: str) -> None:
        if len(decoder_blocks(teacher)) != layers:
            raise ConfigError(f"method.teacher: the teacher has {len(decoder_blocks(teacher))} blocks, the {what} "
                              f"{layers}; ICoT-KD pairs teacher layer l with {what} layer l (set model.n_layer)")
        self.teacher = self._frozen(teacher)

    def teacher_batch_states(self, batch: dict) -> torch.Tensor:
        width = int(batch["teacher_mask"].sum(1).max())
        eos = batch["teacher_eos"]
        positions = diagonal_positions(eos[:, 0], eos[:, 1], len(decoder_blocks(self.teacher)))
        return teacher_states(self.teacher, batch["teacher_ids"][:, :width], batch["teacher_mask"][:, :width],
                              positions)

    def gold_states(self, examples: list[Example], tokenizer, device) -> torch.Tensor:
        """Teacher states of the examples with their gold chains (what the student is evaluated with)."""
        eos = tokenizer.eos_token_id
        taught = self.rows(self._cot.token_ids(examples, tokenizer), eos, self._teacher_len)
        batch = {"teacher_ids": torch.from_numpy(taught["input_ids"]).to(device),
                 "teacher_mask": torch.from_numpy(taught["attention_mask"]).to(device)}
        batch["teacher_eos"] = eos_positions(batch["teacher_ids"], eos, 2)
        return self.teacher_batch_states(batch)


class KDStudent(_ReadsTeacher):
    """Stage (a): the mind-reading student, trained on the answer with the teacher's states substituted."""

    name = "kd_student"
    Params = StudentParams

    def build_model(self, cfg, tokenizer, max_len: int, device: torch.device, inputs: dict | None = None):
        if cfg.pretrained and (Path(cfg.pretrained) / SHAPE_FILE).is_file():
            return MindReadingStudent.from_pretrained(cfg.pretrained, device)  # a finished student run
        (teacher,) = self._inputs(inputs, "teacher")
        lm = super().build_model(cfg, tokenizer, max_len, device)
        self.set_teacher(teacher.model, len(decoder_blocks(lm)), "student")
        return MindReadingStudent(lm, _hidden_size(teacher.model)).to(device)

    def logits(self, model, batch: dict) -> torch.Tensor:
        width = int(batch["attention_mask"].sum(1).max())
        return model(batch["input_ids"][:, :width], batch["attention_mask"][:, :width],
                     self.teacher_batch_states(batch), batch["at"])

    def thought_states(self, model, examples, tokenizer, prompts, at):
        return self.gold_states(examples, tokenizer, prompts["input_ids"].device)

    def student_of(self, model) -> MindReadingStudent:
        return model


class KDEmulator(_ReadsTeacher):
    """Stage (b): the thought emulator, trained to predict the teacher's states (Σ_l ½‖ẑ_l − z_l‖², mean
    over the batch); evaluated by answering through the frozen student of stage (a)."""

    name = "kd_emulator"
    Params = EmulatorParams
    student: MindReadingStudent | None = None

    def build_model(self, cfg, tokenizer, max_len: int, device: torch.device, inputs: dict | None = None):
        if cfg.pretrained and (Path(cfg.pretrained) / SHAPE_FILE).is_file():
            return ThoughtEmulator.from_pretrained(cfg.pretrained, device)
        teacher, student = self._inputs(inputs, "teacher", "student")
        lm = super().build_model(cfg, tokenizer, max_len, device)
        self.set_teacher(teacher.model, len(decoder_blocks(lm)), "emulator")
        if _hidden_size(lm) != _hidden_size(teacher.model):
            raise ConfigError(f"model.d_model: the emulator predicts the teacher's {_hidden_size(teacher.model)}-wide "
                              f"states; expected d_model={_hidden_size(teacher.model)}")
        if not isinstance(student.model, MindReadingStudent):
            raise ConfigError("method.student: expected a kd_student run")
        self.student = self._frozen(student.model)
        return ThoughtEmulator(lm, self.params.mixture_size, self.params.softmax_temperature).to(device)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        target = self.teacher_batch_states(batch)
        width = int(batch["at"].max()) + 1  # the emulator reads up to the prompt's EOS
        predicted = model(batch["input_ids"][:, :width], batch["attention_mask"][:, :width], batch["at"])
        return 0.5 * (predicted.float() - target).pow(2).sum(-1).sum(-1).mean(), {}

    def thought_states(self, model, examples, tokenizer, prompts, at):
        positions = (prompts["attention_mask"].cumsum(1) - 1).clamp(min=0)
        return model(prompts["input_ids"], prompts["attention_mask"], at, position_ids=positions)

    def student_of(self, model) -> MindReadingStudent:
        return self.student


class KDCoupled(_DistillMethod):
    """Stage (c): couple and optimize: the emulator's predictions feed the student, both trained on the
    answer loss (or the student alone with `fix_emulator`)."""

    name = "kd_coupled"
    Params = CoupledParams

    def build_model(self, cfg, tokenizer, max_len: int, device: torch.device, inputs: dict | None = None):
        if cfg.pretrained and (Path(cfg.pretrained) / "student" / SHAPE_FILE).is_file():
            return CoupledThoughts.from_pretrained(cfg.pretrained, device)
        student, emulator = self._inputs(inputs, "student", "emulator")
        if not isinstance(student.model, MindReadingStudent) or not isinstance(emulator.model, ThoughtEmulator):
            raise ConfigError("method.student, method.emulator: expected a kd_student and a kd_emulator run")
        model = CoupledThoughts(emulator.model, student.model).train().requires_grad_(True)
        if self.params.fix_emulator:
            model.emulator.requires_grad_(False)
        return model.to(device)

    def logits(self, model, batch: dict) -> torch.Tensor:
        width = int(batch["attention_mask"].sum(1).max())
        return model(batch["input_ids"][:, :width], batch["attention_mask"][:, :width], batch["at"])

    def thought_states(self, model, examples, tokenizer, prompts, at):
        positions = (prompts["attention_mask"].cumsum(1) - 1).clamp(min=0)
        return model.emulator(prompts["input_ids"], prompts["attention_mask"], at, position_ids=positions)

    def student_of(self, model) -> MindReadingStudent:
        return model.student
