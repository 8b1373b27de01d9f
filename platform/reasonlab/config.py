"""Typed job configuration: YAML files, dotted `key=value` overrides, validation.

A job is a YAML mapping with one section per dataclass below. Every key is checked against the
dataclass fields (unknown keys and wrong types are errors), then each section checks its values.
Errors are `ConfigError` with one line naming the key and what was expected; the CLI turns them into
exit status 2 before anything starts.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from reasonlab.errors import ConfigError  # re-exported: `from reasonlab.config import ConfigError`
from reasonlab.methods import METHODS
from reasonlab.runref import RunRef
from reasonlab.tasks import TASKS


# ----------------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig:
    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    d_ff: Optional[int] = None  # default 4 * d_model
    dropout: float = 0.0
    max_len: Optional[int] = None  # position table size; default: the task's sequence length
    pretrained: Optional[str] = None  # local path or hub id loaded with from_pretrained
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # target parameter count: d_model (a multiple of 16) and n_head (head size 16) are then derived from
    # it and n_layer, as in EleutherAI's capacity sweeps (capacity_and_grokking.md §1.4)
    n_params: Optional[int] = None

    def check(self) -> None:
        _positive(self, "model", "n_layer", "d_model", "n_head")
        if self.pretrained and _looks_like_path(self.pretrained):
            folder = Path(self.pretrained).expanduser()
            if not (folder / "config.json").is_file():
                raise ConfigError(f"model.pretrained: {self.pretrained} is not a folder holding a saved model "
                                  f"(no config.json there); expected a save_pretrained folder or a hub id")
        elif self.pretrained:
            _check_hub_id(self.pretrained)
        if self.n_params is not None:
            _positive(self, "model", "n_params")
            if self.pretrained:
                raise ConfigError("model.n_params: cannot size a pretrained model; drop one of the two")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model: {self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.d_ff is not None:
            _positive(self, "model", "d_ff")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout: expected a value in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    lr: float = 1e-3
    max_steps: int = 1000
    batch_size: int = 64  # rows per optimizer step, all workers and accumulation steps together (a row holds
    # one example, or method.pack packed examples)
    grad_accum: int = 1
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    seed: int = 0
    eval_every: int = 500  # validation (every named evaluation set of the task)
    checkpoint_every: Optional[int] = None  # resume checkpoints, the latest two kept; default: eval_every
    # models kept for later analysis (`reasonlab probe RUN --step N`, `method.teacher: RUN@N`), saved with
    # save_pretrained as the artifacts snapshots/step_XXXXXXXX: a list of steps, or a count of steps spaced
    # evenly on a log scale from 1 to max_steps
    snapshot_steps: Union[int, list[int], None] = None
    log_every: int = 20
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where CUDA supports it
    # torch.compile the training step's module (model and the method's loss) and the model evaluation decodes with;
    # the first steps are slower while it compiles (and again when row widths change)
    compile: bool = False
    # Grokfast (Lee et al. 2024): `ema` adds grad_filter_lambda times an exponential moving average of the
    # gradients (decay grad_filter_alpha) to each gradient, amplifying its slow components
    grad_filter: Literal["none", "ema"] = "none"
    grad_filter_alpha: float = 0.98
    grad_filter_lambda: float = 2.0

    def check(self) -> None:
        _positive(self, "train", "lr", "max_steps", "batch_size", "grad_accum", "eval_every", "log_every")
        if self.checkpoint_every is not None:
            _positive(self, "train", "checkpoint_every")
        if isinstance(self.snapshot_steps, int):
            _positive(self, "train", "snapshot_steps")
        elif self.snapshot_steps is not None:
            outside = [s for s in self.snapshot_steps if not 1 <= s <= self.max_steps]
            if outside:
                raise ConfigError(f"train.snapshot_steps: step {outside[0]} is outside 1..train.max_steps="
                                  f"{self.max_steps}")
        if not 0 <= self.grad_filter_alpha < 1:
            raise ConfigError(f"train.grad_filter_alpha: expected a value in [0, 1), got {self.grad_filter_alpha}")
        if self.grad_filter_lambda < 0:
            raise ConfigError(f"train.grad_filter_lambda: expected a value >= 0, got {self.grad_filter_lambda}")
        for key in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: expected a value >= 0, got {getattr(self, key)}")
        for key in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"train.{key}: expected a value in [0, 1], got {getattr(self, key)}")

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.eval_every

    def snapshots(self) -> list[int]:
        """The steps whose model is kept (train.snapshot_steps), ascending."""
        if isinstance(self.snapshot_steps, int):
            count = min(self.snapshot_steps, self.max_steps)
            spaced = [round(self.max_steps ** (i / max(1, count - 1))) for i in range(count)] if count > 1 else []
            return sorted({*spaced, self.max_steps})
        return sorted(set(self.snapshot_steps or ()))


@dataclass
class EvalConfig:
    num_examples: int = 500  # fixed validation set evaluated every train.eval_every steps
    test_examples: int = 1000  # fixed test set evaluated once at the end
    batch_size: int = 64  # decoding batch size; the ICoT papers quote throughput at batch size 1
    max_new_tokens: Optional[int] = None  # default: the task's longest target plus a margin
    log_predictions: int = 50  # predictions saved with the run
    steps: Optional[int] = None  # diffusion methods: sampling steps T (default: method.steps)
    samples: int = 1  # self-consistency: answers sampled per question, the most frequent one counts
    seed: int = 0  # seeds every random choice of an evaluation (samples, diffusion samplers)
    # autoregressive methods: the KV cache of token-by-token decoding. dynamic: transformers' default, grown by one
    # slot per token; static: preallocated (StaticCache), the same tokens, and on CUDA each token's forward is
    # replayed as a CUDA graph (torch.compile mode="reduce-overhead"), for batch-1 throughput
    decoder: Literal["dynamic", "static"] = "dynamic"

    def check(self) -> None:
        _positive(self, "eval", "num_examples", "test_examples", "batch_size", "samples")
        for key in ("max_new_tokens", "steps"):
            if getattr(self, key) is not None:
                _positive(self, "eval", key)
        if self.log_predictions < 0:
            raise ConfigError(f"eval.log_predictions: expected a value >= 0, got {self.log_predictions}")


@dataclass
class TrackingConfig:
    experiment: str = "reasonlab"
    run_name: Optional[str] = None  # a finished or killed run with this name is resumed
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else a SQLite store under $REASONLAB_HOME
    storage_path: Optional[str] = None  # Ray Train checkpoints; default $REASONLAB_HOME/ray_results

    def check(self) -> None:
        if self.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name):
            raise ConfigError(f"tracking.run_name: expected letters, digits, '.', '_' or '-', got {self.run_name!r}")


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: Optional[float] = None  # default: 1, or less so that Ray Data keeps a CPU
    gpus_per_worker: float = 1.0
    torch_threads: Optional[int] = None  # default: this machine's cores / workers
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the run fails

    def check(self) -> None:
        _positive(self, "scaling", "num_workers", "gpus_per_worker")
        if self.cpus_per_worker is not None:
            _positive(self, "scaling", "cpus_per_worker")
        if self.torch_threads is not None:
            _positive(self, "scaling", "torch_threads")
        if self.max_failures < -1:
            raise ConfigError(f"scaling.max_failures: expected -1 (no limit) or a value >= 0, got {self.max_failures}")


@dataclass
class Config:
    task: Any  # the dataclass registered for task.name
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the dataclass registered for method.name
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    job: str = "job"  # the job file's stem, used in run names

    def check(self) -> None:
        for section in SECTIONS:
            getattr(self, section).check()
        METHODS[self.method.name].check_config(self)  # the method's rules across sections
        per_step = self.scaling.num_workers * self.train.grad_accum
        if self.train.batch_size % per_step:
            raise ConfigError(
                f"train.batch_size: {self.train.batch_size} is not divisible by "
                f"scaling.num_workers * train.grad_accum = {per_step}"
            )

    @property
    def micro_batch_size(self) -> int:
        """Examples in one forward pass of one worker."""
        return self.train.batch_size // (self.scaling.num_workers * self.train.grad_accum)

    def to_dict(self) -> dict:
        out = {section: _plain(getattr(self, section)) for section in SECTIONS}
        out["job"] = self.job
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """`section.key` → value, for MLflow params."""
        return {f"{s}.{k}": v for s in SECTIONS for k, v in _plain(getattr(self, s)).items()}

    def run_refs(self) -> dict[str, RunRef]:
        """The finished runs this job's method reads (`method.teacher`, ...): field → reference."""
        return {f.name: getattr(self.method, f.name) for f in dataclasses.fields(self.method)
                if isinstance(getattr(self.method, f.name), RunRef)}

    def replace(self, **sections: dict) -> "Config":
        """A copy with some section fields changed, validated again."""
        data = self.to_dict()
        for section, values in sections.items():
            data[section].update(values)
        return config_from_dict(data, job=self.job)


SECTIONS = ("task", "model", "method", "train", "eval", "tracking", "scaling")
_SECTION_TYPES = {
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
    "scaling": ScalingConfig,
}


def _plain(section: Any) -> dict:
    """A section as plain YAML values (run references as their `RUN[@STEP]` text)."""
    return {f.name: str(v) if isinstance(v, RunRef) else copy.deepcopy(v)
            for f in dataclasses.fields(section) for v in [getattr(section, f.name)]}


# ----------------------------------------------------------------------------------------------------
# Loading


def read_yaml_mapping(path: str | Path, kind: str, expected: str) -> dict:
    """A YAML file that must hold a mapping; `kind` and `expected` word the errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); expected a YAML {kind} file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {kind} file: {e.strerror or e}") from None
    except yaml.reader.ReaderError as e:  # valid UTF-8 holding control characters (NUL, ...): a binary file
        byte = len(text[: e.position].encode("utf-8"))
        raise ConfigError(f"{path}: not a text file (control character {e.character:#04x} at byte {byte}); "
                          f"expected a YAML {kind} file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {expected}, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a job file, apply `section.key=value` overrides, validate."""
    path = Path(path)
    data = read_yaml_mapping(path, "job", "sections (task, model, ...)")
    apply_overrides(data, overrides)
    return config_from_dict(data, job=path.stem)


def override_list(value: Any, where: str) -> list[str]:
    """A file's list of KEY=VALUE overrides (absent: none)."""
    value = value or []
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise ConfigError(f"{where}: expected a list of KEY=VALUE strings")
    return value


def apply_overrides(data: dict, overrides: list[str]) -> None:
    """Set `a.b=value` in a nested dict; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: expected an override of the form section.key=value")
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {p} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            node[parts[-1]] = raw


def config_from_dict(data: dict, job: str = "job") -> Config:
    data = dict(data)
    data.pop("job", None)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; expected one of {list(SECTIONS)}")
    task = data.get("task")
    if not isinstance(task, dict) or "name" not in task:
        raise ConfigError(f"task.name: required; expected one of {sorted(TASKS)}")
    if task["name"] not in TASKS:
        raise ConfigError(f"task.name: unknown task {task['name']!r}; expected one of {sorted(TASKS)}")
    method = data.get("method") or {}
    if not isinstance(method, dict):
        raise ConfigError(f"method: expected a mapping, got {type(method).__name__}")
    method = {"name": "cot", **method}
    if method["name"] not in METHODS:
        raise ConfigError(f"method.name: unknown method {method['name']!r}; expected one of {sorted(METHODS)}")
    sections = {"task": build_dataclass(TASKS[task["name"]].Params, task, "task"),
                "method": build_dataclass(METHODS[method["name"]].Params, method, "method")}
    for name, cls in _SECTION_TYPES.items():
        sections[name] = build_dataclass(cls, data.get(name) or {}, name)
    _absolute_paths(sections)
    config = Config(**sections, job=job)
    config.check()
    return config


def _absolute_paths(sections: dict) -> None:
    """Local paths in the job (task files, a pretrained model folder) made absolute against the directory
    the job was started from: Ray workers run elsewhere, and the resolved config is what they get."""
    task = sections["task"]
    for f in dataclasses.fields(task):
        value = getattr(task, f.name)
        if f.name.endswith("_path") and isinstance(value, str) and value:
            setattr(task, f.name, os.path.abspath(os.path.expanduser(value)))
    model = sections["model"]
    if model.pretrained and _looks_like_path(model.pretrained):
        model.pretrained = os.path.abspath(os.path.expanduser(model.pretrained))


def build_dataclass(cls: type, values: Any, where: str):
    """Instantiate `cls` from a mapping, checking keys and types; `where` prefixes error keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}.{key}: unknown key; expected one of {names}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        if not math.isfinite(number):  # YAML reads 1e400 as infinity, and .nan is a float
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is RunRef:
        if isinstance(value, RunRef):
            return value
        return RunRef.parse(value, key)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {_show(value)}")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _looks_like_path(value: str) -> bool:
    """A local path rather than a hub id (`name` or `org/name`)."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or Path(value).exists()


def _check_hub_id(value: str) -> None:
    """A `model.pretrained` that is not a local path must be a hub id by the hub's own rules (whether the
    hub has it is asked once by the driver: models.hub.check_hub_model)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise ConfigError(f"model.pretrained: {value!r} is neither a local model folder nor a hub id "
                          f"('name' or 'owner/name'): {' '.join(str(e).split())}") from None


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _positive(obj: Any, section: str, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if not value > 0:
            raise ConfigError(f"{section}.{key}: expected a value > 0, got {value}")
