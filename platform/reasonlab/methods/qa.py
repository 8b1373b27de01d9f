"""Question answering with the loss on the answer only, several questions packed per row.

Each question is `Question: {q} Answer: {a}<eos>` as in EleutherAI's transformer-reasoning
(capacity_and_grokking.md §1.2). Only the answer tokens and its EOS are supervised: the EOS ends the
answer, so its loss is part of the answer's code length and decoding knows where to stop.

Packed questions do not see each other: position ids restart at 0 for every question and no 2-D
attention mask is passed, from which transformers builds a block-diagonal causal mask for SDPA and
variable-length attention for flash-attn. Padding at the row's end forms its own block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from reasonlab.errors import ConfigError
from reasonlab.methods.autoregressive import AutoregressiveMethod
from reasonlab.methods.base import IGNORE, MethodParams
from reasonlab.tasks import Example


@dataclass
class QAParams(MethodParams):
    name: str = "qa"
    pack: int = 1  # questions per training row

    def check(self) -> None:
        if self.pack < 1:
            raise ConfigError(f"method.pack: expected a value > 0, got {self.pack}")


class AnswerOnly(AutoregressiveMethod):
    Params = QAParams
    name = "qa"
    eos_in_target = 1

    def __init__(self, params: QAParams | None = None, cfg=None) -> None:
        super().__init__(params, cfg)
        self.examples_per_row = self.params.pack

    def prompt_text(self, example: Example, eos: str) -> str:
        return f"Question: {example.prompt} Answer:"

    def target_text(self, example: Example, eos: str) -> str:
        return f" {example.answer}{eos}"

    def encode(self, examples: list[Example], tokenizer, seq_len: int, indices=None) -> dict[str, np.ndarray]:
        """Rows of `pack` consecutive questions: input ids, labels on answers, per-question positions,
        and a mask of the real (non-padding) tokens."""
        eos = tokenizer.eos_token
        k = self.examples_per_row
        if len(examples) % k:
            raise ValueError(f"{len(examples)} examples do not fill rows of {k}")
        prompts = tokenizer([self.prompt_text(e, eos) for e in examples], add_special_tokens=False)["input_ids"]
        targets = tokenizer([self.target_text(e, eos) for e in examples], add_special_tokens=False)["input_ids"]
        rows = len(examples) // k
        input_ids = np.full((rows, seq_len), tokenizer.eos_token_id, dtype=np.int64)
        labels = np.full((rows, seq_len), IGNORE, dtype=np.int64)
        position_ids = np.zeros((rows, seq_len), dtype=np.int64)
        mask = np.zeros((rows, seq_len), dtype=np.int64)
        start = 0
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            row, at = divmod(i, k)
            if at == 0:
                start = 0
            ids = prompt + target
            stop = start + len(ids)
            if stop > seq_len:
                raise ValueError(f"a row of {k} questions needs more than {seq_len} tokens; the length probe "
                                 f"missed a longer question: {examples[i].prompt!r}")
            input_ids[row, start:stop] = ids
            labels[row, start + len(prompt):stop] = target
            position_ids[row, start:stop] = np.arange(len(ids))
            mask[row, start:stop] = 1
            start = stop
            if at == k - 1:  # padding is one more block of its own
                position_ids[row, stop:] = np.arange(seq_len - stop)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        width = int(batch["attention_mask"].sum(1).max())
        return model(input_ids=batch["input_ids"][:, :width], position_ids=batch["position_ids"][:, :width],
                     use_cache=False).logits  # no cache: transformers only isolates packed blocks without one

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Mean cross-entropy over answer tokens.

        Answers are a few tokens of each question, so the output layer (most of a small model's work
        with a large vocabulary) runs on the positions that predict them only. This runs inside the
        module DDP wraps (loop.MethodModule), so calling the model's parts directly is safe there too."""
        width = int(batch["attention_mask"].sum(1).max())
        hidden = model.base_model(input_ids=batch["input_ids"][:, :width],
                                  position_ids=batch["position_ids"][:, :width], use_cache=False).last_hidden_state
        labels = batch["labels"][:, 1:width]
        keep = labels != IGNORE
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), labels[keep]), {}

    def answer(self, generated: str, eos: str) -> str:
        """The text before the first EOS, whitespace normalized."""
        return " ".join(generated.split(eos)[0].split())
