"""GSM8K (or any open-text task) read from files in the implicit-CoT line format."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from reasonlab.errors import ConfigError
from reasonlab.tasks.base import Example, Task, counter_hash, parse_line, read_lines


@dataclass
class GSM8KParams:
    name: str = "gsm8k"
    train_path: Optional[str] = None
    valid_path: Optional[str] = None
    test_path: Optional[str] = None
    seed: int = 0  # shuffles the training file, differently each epoch
    vocab_size: int = 4096  # byte-level BPE trained on the training file

    def check(self) -> None:
        for key in ("train_path", "valid_path", "test_path"):
            path = getattr(self, key)
            if not path:
                raise ConfigError(f"task.{key}: required for task {self.name!r} (an ICoT-format file)")
            if not os.path.isfile(path):
                raise ConfigError(f"task.{key}: file not found: {path}")
        if self.vocab_size < 300:
            raise ConfigError(f"task.vocab_size: expected at least 300 (256 bytes + merges), got {self.vocab_size}")


@functools.lru_cache(maxsize=8)
def _read(path: str) -> tuple[Example, ...]:
    try:
        return tuple(parse_line(line) for line in read_lines(path))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


class GSM8KTask(Task):
    Params = GSM8KParams

    def heldout(self, split: str) -> list[Example]:
        return list(_read(getattr(self.params, f"{split}_path")))

    @functools.cached_property
    def _train(self) -> tuple[Example, ...]:
        held = self.heldout_prompts()
        kept = tuple(e for e in _read(self.params.train_path) if e.prompt not in held)
        if not kept:
            raise ConfigError("task.train_path: no training examples left after removing held-out prompts")
        return kept

    def examples(self, start: int, stop: int) -> list[Example]:
        # epoch e visits the file in its own permutation: sort by a counter hash of (epoch, line)
        n = len(self._train)
        out = []
        for i in range(start, stop):
            epoch, pos = divmod(i, n)
            out.append(self._train[self._order(epoch)[pos]])
        return out

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        n = len(self._train)
        keys = counter_hash(self.params.seed + 7919 * epoch, "train", np.arange(n, dtype=np.uint64))
        return np.argsort(keys, kind="stable")

    def corpus(self):
        return [e.line() for e in self._train]

    def length_probe(self, tokenizer=None):
        return list(self._train) + super().length_probe()
