"""The Method interface: how a model is built, what it trains on, its loss, and how it answers.

Every method subclasses `Method` and declares what it can do with class attributes, so the loop, the
evaluator and the config never guess from which methods exist (`decoding`, `teacher_forced`,
`needs_cot`). A new method is one module plus one line in the registry (methods/__init__.py).

The hooks, in the order a run meets them:
  check_config(cfg)          rules that cross sections, before anything starts (ConfigError, one line)
  setup(task, tokenizer)     once wherever the method meets its task and tokenizer (driver, data workers,
                             training workers): facts that need both, such as the longest chain of thought
  build_model(cfg, tokenizer, max_len, device, inputs)   inputs: the finished runs it reads (a teacher)
  encode(examples, tokenizer, seq_len, indices)   in Ray Data; `indices` are the examples' stream indices,
                             so anything random per example is a function of the index and resumes exactly
  loss(model, batch) -> (loss, metrics)           inside the module DDP wraps (loop.MethodModule)
  on_step(step, loop)        after each optimizer step (stepwise internalization resets the optimizer)
  lr_scale(step)             a factor on the schedule's learning rate at a step (a ramp after each reset)
  step_metrics(step)         values of the schedule at a step, logged with the loss
  generate_text(...), answer(...)                 evaluation
  save(model, directory), finish(history, directory)   the run's artifacts (history: fetched on demand)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch

from reasonlab.errors import ConfigError
from reasonlab.tasks import TASKS, Example

IGNORE = -100


@dataclass
class MethodParams:
    """A method's section of the job file; methods with options subclass it."""
    name: str = "cot"

    def check(self) -> None:
        pass


class Method:
    Params: ClassVar[type] = MethodParams
    name: ClassVar[str] = ""
    # "autoregressive": token by token from the prompt; "parallel": the whole target in `steps`
    # denoising steps (eval.steps applies)
    decoding: ClassVar[Literal["autoregressive", "parallel"]] = "autoregressive"
    teacher_forced: ClassVar[bool] = True  # a target's loss given the prompt is defined (capacity needs it)
    needs_cot: ClassVar[bool] = False  # trains on the task's chain of thought
    model_kind: ClassVar[str | None] = None  # named in the run's model line; None: model.arch
    examples_per_row = 1  # examples packed into one training row
    eos_in_target = 1  # decoding stops after this many EOS tokens

    def __init__(self, params: MethodParams | None = None, cfg=None) -> None:
        """`params`: the job's method section; `cfg`: the whole job, for methods whose schedule is
        counted in optimizer steps (None in tests that need none)."""
        self.params = params if params is not None else self.Params(name=self.name)
        self.cfg = cfg

    # ---- configuration ----
    @classmethod
    def check_config(cls, cfg) -> None:
        """Rules between the method section and the rest of the job; raise ConfigError."""
        if cfg.eval.steps is not None and cls.decoding != "parallel":
            raise ConfigError(f"eval.steps: sampling steps apply to diffusion methods; method.name is "
                              f"{cfg.method.name!r}")
        if cfg.eval.decoder != "dynamic" and cls.decoding != "autoregressive":
            raise ConfigError(f"eval.decoder: a KV cache applies to token-by-token decoding; method "
                              f"{cfg.method.name!r} decodes in parallel")
        if cls.needs_cot and not TASKS[cfg.task.name].has_cot:
            raise ConfigError(f"method.name: {cfg.method.name!r} trains on a chain of thought; task "
                              f"{cfg.task.name!r} has none")

    def setup(self, task, tokenizer) -> None:
        """Called once with the run's task and tokenizer, before encoding or training."""

    # ---- texts ----
    def prompt_text(self, example: Example, eos: str) -> str:
        return f" {example.prompt} {eos}"

    def target_text(self, example: Example, eos: str) -> str:
        raise NotImplementedError

    def answer(self, generated: str, eos: str) -> str:
        """The answer in a decoded target: the text after the last `####` of the part before the
        `eos_in_target`-th EOS, commas stripped, whitespace normalized."""
        parts = generated.split(eos)
        body = parts[self.eos_in_target - 1] if len(parts) >= self.eos_in_target else generated
        if "####" not in body:
            return ""
        return " ".join(body.rpartition("####")[2].replace(",", "").split())

    # ---- model ----
    def build_model(self, cfg, tokenizer, max_len: int, device: torch.device, inputs: dict | None = None):
        """A causal LM from the `model:` section (or its `pretrained` path): what this method trains.
        `inputs`: the finished runs the job's method section names (`runs.LoadedRun` by field, e.g.
        `teacher`), when training; frozen ones stay on the method, outside the returned module."""
        from reasonlab.models.causal import build_causal_lm

        return build_causal_lm(cfg, len(tokenizer), max_len, tokenizer.eos_token_id, device)

    def extra_state_ids(self, tokenizer, model) -> range:
        """Model input states beyond the tokenizer's that training uses (a diffusion model's mask)."""
        return range(0)

    def save(self, model, directory: str) -> None:
        model.save_pretrained(directory)

    # ---- training ----
    def encode(self, examples: list[Example], tokenizer, seq_len: int, indices=None) -> dict:
        """Training rows as equal-length int64 arrays; `indices[i]` is example i's stream index."""
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(mean loss of the batch, extra metrics to log: name → float or 0-d tensor)."""
        raise NotImplementedError

    def step_metrics(self, step: int) -> dict[str, float]:
        """Schedule values at optimizer step `step` (logged with the loss)."""
        return {}

    def on_step(self, step: int, loop) -> None:
        """After optimizer step `step` (1-based: `step` steps done); `loop` is the TrainLoop."""

    def lr_scale(self, step: int) -> float:
        """A factor on train.lr's schedule at optimizer step `step` (0-based); a pure function of the step."""
        return 1.0

    # ---- evaluation ----
    def generate_text(self, model, tokenizer, examples: list[Example], *, max_new_tokens: int, seq_len: int | None,
                      device: torch.device, generator: torch.Generator, sample: bool = False,
                      steps: int | None = None, decoder: str = "dynamic") -> list[str]:
        """Each example's generated target as text, for `answer`. Greedy unless `sample`; every random
        choice comes from `generator`. `decoder` (eval.decoder) is how token-by-token decoding keeps its cache."""
        raise NotImplementedError

    def sampling_settings(self, steps: int | None) -> list[str]:
        """How this method decodes, in words, for result lines (e.g. `T=16`)."""
        return []

    def finish(self, history: Callable[[], dict[str, list[tuple[int, float]]]], directory: str) -> None:
        """Write the run's method-specific artifacts (plots) into `directory`. `history()` reads every
        metric's (step, value) series from the tracking store: one query per metric, so only methods that
        draw something call it."""
