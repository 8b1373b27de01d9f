"""Question answering with the loss on the answer only, several questions packed per row.

Each question is `Question: {q} Answer: {a}<eos>` as in EleutherAI's transformer-reasoning
(capacity_and_grokking.md §1.2). Only the answer tokens and its EOS are supervised: the EOS ends the
answer, so its loss is part of the answer's code length and decoding knows where to stop.

Several questions pack into a row (`method.pack`) as autoregressive methods pack examples: packed
questions never see each other (methods/autoregressive.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from reasonlab.methods.autoregressive import AutoregressiveMethod, AutoregressiveParams, pack_rows
from reasonlab.methods.base import IGNORE
from reasonlab.tasks import Example


@dataclass
class QAParams(AutoregressiveParams):
    name: str = "qa"


class AnswerOnly(AutoregressiveMethod):
    Params = QAParams
    name = "qa"
    eos_in_target = 1

    def prompt_text(self, example: Example, eos: str) -> str:
        return f"Question: {example.prompt} Answer:"

    def target_text(self, example: Example, eos: str) -> str:
        return f" {example.answer}{eos}"

    def encode(self, examples: list[Example], tokenizer, seq_len: int, indices=None) -> dict[str, np.ndarray]:
        """Rows of `pack` consecutive questions (`pack_rows`), labels on the answers."""
        eos = tokenizer.eos_token
        prompts = tokenizer([self.prompt_text(e, eos) for e in examples], add_special_tokens=False)["input_ids"]
        targets = tokenizer([self.target_text(e, eos) for e in examples], add_special_tokens=False)["input_ids"]
        return pack_rows([p + t for p, t in zip(prompts, targets)], [len(p) for p in prompts],
                         self.examples_per_row, tokenizer.eos_token_id, seq_len)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Mean cross-entropy over answer tokens.

        Answers are a few tokens of each question, so the output layer (most of a small model's work
        with a large vocabulary) runs on the positions that predict them only. This runs inside the
        module DDP wraps (loop.MethodModule), so calling the model's parts directly is safe there too."""
        hidden = self.hidden_states(model, batch)
        labels = batch["labels"][:, 1:hidden.shape[1]]
        keep = labels != IGNORE
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), labels[keep]), {}

    def answer(self, generated: str, eos: str) -> str:
        """The text before the first EOS, whitespace normalized."""
        return " ".join(generated.split(eos)[0].split())
