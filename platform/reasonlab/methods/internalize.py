"""Stepwise Internalization (Deng et al. 2024): explicit CoT training whose chain of thought loses
tokens as training goes, until the model answers with none written (reference/icot.md §3,
turn2_additions.md §1).

Rows are ` prompt <eos> cot <eos> #### answer <eos>`, as for `cot`. The example of stream index i is trained
at step t = i // (train.batch_size · method.pack), the examples per step, and loses `s(t) + o_i` chain tokens:
  s(t)  the scheduled count: 0 during `pretrain_epochs`, then one more every round(steps_per_epoch / Δ)
        steps (Δ = `remove_per_epoch`, steps_per_epoch = ⌈epoch_examples / examples per step⌉), and all of
        the chain once s reaches `remove_all_beyond`;
  o_i   the smoothing offset, P(o) ∝ e^{−λ o} truncated at 100 (λ = `smoothing_lambda`), drawn from the
        example's stream index with the counter-based RNG: no process-local random state.
Both are functions of (index, step), so a resumed run removes exactly what the run it continues would
have. `side: left` removes from the chain's start, `right` from its end; the EOS that closes the chain
is always kept, and positions are recounted over the kept tokens (the reference's default). Removal
happens where rows are encoded (Ray Data), so rows shrink and the loss runs on the shorter width.

Evaluation is the `cot` evaluator unchanged: greedy decoding from ` prompt <eos>`, stopping after two
EOS; a fully internalized model writes `<eos> #### answer <eos>`.

Deviations from the reference, on purpose: no batch is skipped for length; decoding is greedy (the
reference samples since 2025-01); the optimizer reset stops once the schedule covers the task's longest
chain (the reference asks whether the previous batch happened to have none left, which depends on the
drawn offsets), so a resumed run resets at the same steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from reasonlab.errors import ConfigError
from reasonlab.methods.autoregressive import AutoregressiveParams, ExplicitCoT
from reasonlab.tasks.base import counter_hash

MAX_OFFSET = 100  # the reference truncates the offset distribution here
_OFFSET_DRAW = 0x51  # the counter RNG stream of the offsets (tasks use draws 0, 1, ...)


@dataclass
class InternalizeParams(AutoregressiveParams):
    name: str = "internalize"
    remove_per_epoch: float = 8.0  # Δ: chain tokens removed per epoch (0: explicit CoT throughout)
    epoch_examples: int = 80_800  # examples in one epoch of the infinite stream (the 4×4 file has 808,000)
    pretrain_epochs: int = 0  # epochs with the full chain before removal starts
    smoothing_lambda: Optional[float] = 4.0  # λ of the offset distribution; null: no offset
    remove_all_beyond: Optional[int] = None  # once s reaches this, remove the whole chain; null: never
    side: Literal["left", "right"] = "left"
    reset_optimizer: bool = True  # fresh AdamW whenever s rises
    # after each reset, the learning rate ramps up again over this many steps (0: at once, as the reference).
    # A fresh AdamW's first updates are lr·sign(g) on every weight, a kick a small model at lr 1e-3 feels
    reset_warmup_steps: int = 0

    def check(self) -> None:
        super().check()
        if not self.remove_per_epoch >= 0:
            raise ConfigError(f"method.remove_per_epoch: expected a value >= 0, got {self.remove_per_epoch}")
        if self.epoch_examples <= 0:
            raise ConfigError(f"method.epoch_examples: expected a value > 0, got {self.epoch_examples}")
        if self.pretrain_epochs < 0:
            raise ConfigError(f"method.pretrain_epochs: expected a value >= 0, got {self.pretrain_epochs}")
        if self.smoothing_lambda is not None and not self.smoothing_lambda > 0:
            raise ConfigError(f"method.smoothing_lambda: expected a value > 0 (or null: no offset), "
                              f"got {self.smoothing_lambda}")
        if self.remove_all_beyond is not None and self.remove_all_beyond <= 0:
            raise ConfigError(f"method.remove_all_beyond: expected a value > 0 (or null: never), "
                              f"got {self.remove_all_beyond}")
        if self.reset_warmup_steps < 0:
            raise ConfigError(f"method.reset_warmup_steps: expected a value >= 0, got {self.reset_warmup_steps}")


def removal_offsets(indices: np.ndarray, lam: float | None, seed: int) -> np.ndarray:
    """The smoothing offset of each stream index: P(o) = (1 − e^{−λ}) e^{−λ o} for o < 100, the rest of
    the mass at 100; by inverting the geometric CDF at a counter-based uniform. λ = None: no offset."""
    if lam is None:
        return np.zeros(len(indices), dtype=np.int64)
    u = (counter_hash(seed, "train", np.asarray(indices, dtype=np.uint64), _OFFSET_DRAW) >> np.uint64(11)) \
        .astype(np.float64) * 2.0 ** -53  # uniform in [0, 1)
    return np.minimum(np.floor(-np.log1p(-u) / lam), MAX_OFFSET).astype(np.int64)


def remove_span(ids: list[int], eos_id: int, to_remove: float, side: str) -> list[int]:
    """` prompt <eos> cot <eos> #### answer <eos>` ids without `to_remove` chain tokens (left or right),
    the chain's closing EOS kept, everything after the third EOS dropped."""
    eos = [j for j, t in enumerate(ids) if t == eos_id][:3]
    if len(eos) < 3:
        raise ValueError(f"a row needs three EOS tokens (prompt, chain, answer); found {len(eos)}")
    first, second, third = eos
    n = int(min(to_remove, second - first - 1))  # never past the chain
    start, stop = (first + 1, first + 1 + n) if side == "left" else (second - n, second)
    return ids[:start] + ids[stop:third + 1]


class StepwiseInternalization(ExplicitCoT):
    Params = InternalizeParams
    name = "internalize"
    cot_tokens: int | None = None  # the task's longest chain in tokens (setup)

    def setup(self, task, tokenizer) -> None:
        self.cot_tokens = 0
        for ids in self.token_ids(task.length_probe(tokenizer), tokenizer):
            first, second = [j for j, t in enumerate(ids) if t == tokenizer.eos_token_id][:2]
            self.cot_tokens = max(self.cot_tokens, second - first - 1)

    # ---- the schedule ----
    @property
    def examples_per_step(self) -> int:
        """train.batch_size rows of `method.pack` examples each."""
        if self.cfg is None:
            raise ValueError("stepwise internalization counts its schedule in optimizer steps: build the method "
                             "with the job config, make_method(cfg.method, cfg)")
        return self.cfg.train.batch_size * self.examples_per_row

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.params.epoch_examples / self.examples_per_step)

    def scheduled(self, step: int) -> float:
        """s: chain tokens removed from every row of the batch trained after `step` steps."""
        p = self.params
        start = p.pretrain_epochs * self.steps_per_epoch
        if step < start or p.remove_per_epoch == 0:
            return 0
        s = (step - start) // max(1, round(self.steps_per_epoch / p.remove_per_epoch))
        return math.inf if p.remove_all_beyond is not None and s >= p.remove_all_beyond else s

    def removal(self, indices: np.ndarray) -> np.ndarray:
        """Tokens removed from each row: s of its step plus its offset (no offset while pretraining, and
        none at all with remove_per_epoch 0: the explicit-CoT baseline)."""
        steps = np.asarray(indices, dtype=np.int64) // self.examples_per_step
        if self.params.remove_per_epoch == 0:
            return np.zeros(len(steps))
        unique, inverse = np.unique(steps, return_inverse=True)  # a block of rows spans few steps
        scheduled = np.array([self.scheduled(int(t)) for t in unique], dtype=np.float64)[inverse]
        offsets = removal_offsets(indices, self.params.smoothing_lambda, self.cfg.train.seed)
        pretraining = steps < self.params.pretrain_epochs * self.steps_per_epoch
        return scheduled + np.where(pretraining, 0, offsets)

    def all_removed(self, s: float) -> bool:
        return s >= (self.cot_tokens if self.cot_tokens is not None else math.inf)

    def step_metrics(self, step: int) -> dict[str, float]:
        s = self.scheduled(max(step - 1, 0))  # the count of the batch just trained
        if self.cot_tokens is not None:
            s = min(s, self.cot_tokens)  # the whole chain, once s covers it (or is infinite: remove_all_beyond)
        return {"train/cot_tokens_removed": float(s)}

    def resets_before(self, step: int) -> bool:
        """Whether the optimizer is rebuilt before step `step` (0-based): the first batch with a higher
        count, until the chain is all gone."""
        previous = self.scheduled(step - 1)
        return (self.params.reset_optimizer and step > 0 and self.scheduled(step) > previous
                and not self.all_removed(previous))

    def on_step(self, step: int, loop) -> None:
        if self.resets_before(step):
            loop.reset_optimizer()

    def lr_scale(self, step: int) -> float:
        """(k + 1) / reset_warmup_steps at the k-th step after the latest reset: a function of the step, so
        a resumed run ramps up alike."""
        warmup = self.params.reset_warmup_steps
        for since in range(warmup - 1):
            if self.resets_before(step - since):
                return (since + 1) / warmup
        return 1.0

    # ---- rows ----
    def encode(self, examples, tokenizer, seq_len: int, indices=None) -> dict[str, np.ndarray]:
        """`cot` rows with the scheduled chain tokens removed; `indices=None` (no stream position)
        removes nothing."""
        encoded = self.token_ids(examples, tokenizer)
        if indices is not None:
            encoded = [remove_span(ids, tokenizer.eos_token_id, n, self.params.side)
                       for ids, n in zip(encoded, self.removal(indices))]
        return self.rows(encoded, tokenizer.eos_token_id, seq_len)

    def finish(self, history, directory: str) -> None:
        from reasonlab.analysis.internalization import plot_internalization

        plot_internalization(history(), f"{directory}/internalization.png", total=self.cot_tokens)
