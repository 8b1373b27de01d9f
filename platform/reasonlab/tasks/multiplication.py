"""n×m multiplication with the chain of thought of the implicit-CoT papers, byte for byte.

Format (reference/icot.md §1.2): digits little-endian and space-separated; each partial product
a·d·10^i written at the fixed width na+1+i; the running sum in parentheses after partial products
1..nb-2; the answer zero-padded to na+nb digits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from reasonlab.errors import ConfigError
from reasonlab.tasks.base import Example, Task, counter_hash, parse_line, read_lines


def rev_digits(x: int, width: int) -> str:
    """x zero-padded to `width` digits, least significant first, space-separated."""
    return " ".join(reversed(str(x).zfill(width)))


def multiplication_example(a: int, b: int, na: int, nb: int) -> Example:
    parts = []
    total = 0
    for i, d in enumerate(int(c) for c in reversed(str(b).zfill(nb))):
        partial = a * d * 10**i
        width = na + 1 + i
        total += partial
        if i == 0:
            parts.append(rev_digits(partial, width))
        else:
            parts.append("+ " + rev_digits(partial, width))
            if i < nb - 1:
                parts.append("( " + rev_digits(total, width) + " )")
    return Example(
        prompt=f"{rev_digits(a, na)} * {rev_digits(b, nb)}",
        cot=" ".join(parts),
        answer=rev_digits(a * b, na + nb),
    )


def operands(prompt: str) -> tuple[int, int]:
    left, right = prompt.split(" * ")
    return int(left.replace(" ", "")[::-1]), int(right.replace(" ", "")[::-1])


@dataclass
class MultiplicationParams:
    name: str = "multiplication"
    a_digits: int = 4
    b_digits: int = 4
    seed: int = 0  # fixes the held-out sets and the training stream
    heldout_size: int = 1000  # examples in each generated valid/test set
    valid_path: Optional[str] = None  # ICoT-format files to use as held-out sets instead
    test_path: Optional[str] = None

    def check(self) -> None:
        for key in ("a_digits", "b_digits"):
            if not 1 <= getattr(self, key) <= 18:
                raise ConfigError(f"task.{key}: expected 1 to 18 digits, got {getattr(self, key)}")
        if self.heldout_size < 1:
            raise ConfigError(f"task.heldout_size: expected a value > 0, got {self.heldout_size}")
        for key in ("valid_path", "test_path"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ConfigError(f"task.{key}: file not found: {path}")


class MultiplicationTask(Task):
    Params = MultiplicationParams
    _MAX_REDRAWS = 64

    def __init__(self, params: MultiplicationParams) -> None:
        super().__init__(params)
        self._heldout: dict[str, list[Example]] = {}
        self._heldout_keys: np.ndarray | None = None

    # operands are uniform over numbers with exactly a_digits / b_digits digits (no leading zero)
    def _draw(self, split: str, index: np.ndarray, draw: int) -> tuple[np.ndarray, np.ndarray]:
        na, nb = self.params.a_digits, self.params.b_digits
        a_lo, b_lo = 10 ** (na - 1), 10 ** (nb - 1)
        ha = counter_hash(self.params.seed, split, index, 2 * draw)
        hb = counter_hash(self.params.seed, split, index, 2 * draw + 1)
        a = a_lo + ha % np.uint64(10**na - a_lo)
        b = b_lo + hb % np.uint64(10**nb - b_lo)
        return a, b

    @staticmethod
    def _keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # one 64-bit key per operand pair; a rare collision only excludes one more pair
        with np.errstate(over="ignore"):
            return (np.asarray(a, np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.asarray(b, np.uint64)

    def _generate(self, a: np.ndarray, b: np.ndarray) -> list[Example]:
        na, nb = self.params.a_digits, self.params.b_digits
        return [multiplication_example(int(x), int(y), na, nb) for x, y in zip(a, b)]

    def heldout(self, split: str) -> list[Example]:
        if split not in ("valid", "test"):
            raise ValueError(f"held-out split must be valid or test, got {split!r}")
        if split not in self._heldout:
            path = getattr(self.params, f"{split}_path")
            if path:
                self._heldout[split] = [self._check_line(line, path) for line in read_lines(path)]
            else:
                self._heldout[split] = self._generated_heldout(split)
        return self._heldout[split]

    def _check_line(self, line: str, path: str) -> Example:
        example = parse_line(line)
        a, b = operands(example.prompt)
        expected = multiplication_example(a, b, self.params.a_digits, self.params.b_digits)
        if expected != example:
            raise ConfigError(f"{path}: line {line[:40]!r} is not a "
                              f"{self.params.a_digits}x{self.params.b_digits} multiplication example")
        return example

    def _generated_heldout(self, split: str) -> list[Example]:
        # distinct pairs, and test never repeats a valid pair
        taken = set() if split == "valid" else {operands(e.prompt) for e in self.heldout("valid")}
        space = 9 * 10 ** (self.params.a_digits - 1) * 9 * 10 ** (self.params.b_digits - 1)
        if 2 * self.params.heldout_size > space // 2:
            raise ConfigError(f"task.heldout_size: {self.params.heldout_size} per split leaves too few "
                              f"of the {space} {self.params.a_digits}x{self.params.b_digits} problems to train on")
        pairs: list[tuple[int, int]] = []
        seen = set(taken)
        index = 0
        while len(pairs) < self.params.heldout_size:
            idx = np.arange(index, index + 4 * self.params.heldout_size, dtype=np.uint64)
            index += len(idx)
            for x, y in zip(*self._draw(split, idx, 0)):
                pair = (int(x), int(y))
                if pair not in seen:
                    seen.add(pair)
                    pairs.append(pair)
                    if len(pairs) == self.params.heldout_size:
                        break
        a, b = (np.array(v, dtype=np.uint64) for v in zip(*pairs))
        return self._generate(a, b)

    def _excluded_keys(self) -> np.ndarray:
        if self._heldout_keys is None:
            pairs = [operands(e.prompt) for s in ("valid", "test") for e in self.heldout(s)]
            a, b = (np.array(v, dtype=np.uint64) for v in zip(*pairs))
            self._heldout_keys = np.unique(self._keys(a, b))
        return self._heldout_keys

    def examples(self, start: int, stop: int) -> list[Example]:
        index = np.arange(start, stop, dtype=np.uint64)
        a, b = self._draw("train", index, 0)
        excluded = self._excluded_keys()
        bad = np.isin(self._keys(a, b), excluded)
        draw = 1
        while bad.any():  # redraw held-out pairs from the same counter, next draw
            if draw > self._MAX_REDRAWS:
                raise RuntimeError("could not draw a training pair outside the held-out sets")
            a2, b2 = self._draw("train", index[bad], draw)
            a[bad], b[bad] = a2, b2
            bad[bad] = np.isin(self._keys(a2, b2), excluded)
            draw += 1
        return self._generate(a, b)

    def probe_targets(self, examples: list[Example]) -> dict[str, tuple[list[int | None], list[str]]]:
        """Each digit of each running sum the chain of thought writes in parentheses (`sum1_digit0` is the least
        significant digit of the first), read at the prompt's last token: what a model answering without
        the chain must hold somewhere."""
        sums = [[group.split() for group in e.cot.split("(")[1:]] for e in examples]
        sums = [[group[: group.index(")")] for group in row] for row in sums]
        targets = {}
        for j, group in enumerate(sums[0] if sums else []):
            for k in range(len(group)):
                targets[f"sum{j + 1}_digit{k}"] = ([None] * len(examples), [row[j][k] for row in sums])
        return targets

    def vocabulary(self) -> list[str]:
        return [str(d) for d in range(10)] + ["*", "+", "(", ")", "####"]

    def length_probe(self, tokenizer=None) -> list[Example]:
        # every line of an n×m problem has the same length; one example of each held-out set suffices
        return [self.heldout("valid")[0], self.heldout("test")[0]]
