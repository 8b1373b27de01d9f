"""What every task provides, and the counter-based random numbers that make example i reproducible."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np

SPLITS = ("train", "valid", "test")
_SPLIT_IDS = {name: i + 1 for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class Example:
    prompt: str
    cot: str
    answer: str

    def line(self) -> str:
        """The implicit-CoT line format: `input||cot #### answer`."""
        return f"{self.prompt}||{self.cot} #### {self.answer}"


def parse_line(line: str) -> Example:
    """Split an ICoT line the way the reference repos do (answer commas stripped)."""
    prompt, sep, target = line.rstrip("\n").partition("||")
    if not sep or "####" not in target:
        raise ValueError(f"not in the input||cot #### answer format: {line[:80]!r}")
    cot, _, answer = target.rpartition("####")
    return Example(prompt.strip(), cot.strip(), answer.strip().replace(",", ""))


class Task:
    """A source of examples. Example i of a split is a pure function of (params, split, i).

    Subclasses set `Params` (a dataclass with a `name` field, validated by config.py) and implement
    `examples` for the training stream and `heldout` for the fixed evaluation sets.
    """

    Params: ClassVar[type]
    has_cot: ClassVar[bool] = True  # examples carry a chain of thought (methods that train on it check this)
    measures_capacity: ClassVar[bool] = False  # provides `capacity_questions` for the capacity analysis

    def __init__(self, params) -> None:
        self.params = params

    def examples(self, start: int, stop: int) -> list[Example]:
        """Training examples start..stop-1; never one whose prompt is in a held-out set."""
        raise NotImplementedError

    def heldout(self, split: str) -> list[Example]:
        """The fixed `valid` or `test` set, in a fixed order."""
        raise NotImplementedError

    def eval_sets(self, split: str) -> dict[str, list[Example]]:
        """Named evaluation sets of a split; each key is the prefix of its metrics."""
        return {"eval" if split == "valid" else "test": self.heldout(split)}

    def vocabulary(self) -> Sequence[str] | None:
        """Every whitespace-separated token the task can produce, or None for open text."""
        return None

    def corpus(self) -> Iterable[str]:
        """Text to train a subword tokenizer on, for open-text tasks."""
        return [e.line() for split in ("valid", "test") for e in self.heldout(split)]

    def length_probe(self, tokenizer=None) -> Iterable[Example]:
        """Examples whose longest encoding under `tokenizer` bounds every example's (sets the padded
        length)."""
        return [e for split in ("valid", "test") for e in self.heldout(split)]

    def write_artifacts(self, directory: str) -> bool:
        """Write the data a run should keep with it (e.g. generated profiles); True if anything was written."""
        return False

    def finish(self, history: Callable[[], dict[str, list[tuple[int, float]]]], directory: str) -> None:
        """Write the run's task-specific artifacts (plots) into `directory` at the end of a run, as
        `Method.finish` does for methods; `history()` reads every metric's (step, value) series from the store,
        so only tasks that draw something call it. Nothing by default."""

    def show(self, example: Example) -> str:
        """One example as `reasonlab data sample` prints it."""
        return example.line()

    def heldout_prompts(self) -> set[str]:
        return {e.prompt for split in ("valid", "test") for e in self.heldout(split)}

    # ---- probes (analysis/probes.py) ----
    def probe_sets(self) -> dict[str, list[Example]]:
        """The named sets `reasonlab probe` reads a model's states on."""
        return self.eval_sets("test")

    def probe_targets(self, examples: list[Example]) -> dict[str, tuple[list[int | None], list[str]]]:
        """What a model may compute on the way to the answer, for linear probes (and the logit lens, where a
        label is one token): name → (per example, the index of the prompt word at whose position it is read,
        or None for the prompt's last token; per example, its value). None declared by default."""
        return {}


def counter_hash(seed: int, split: str, index: np.ndarray, draw: int = 0) -> np.ndarray:
    """64 random bits per index, a pure function of (seed, split, index, draw) (splitmix64 rounds).

    Counter-based, so any range of examples can be generated on any worker without coordination.
    """
    x = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(_SPLIT_IDS[split] << 56))
    x = _mix(x ^ np.asarray(index, dtype=np.uint64))
    return _mix(x ^ np.uint64(draw + 1))


def _mix(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def read_lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")
