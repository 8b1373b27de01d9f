"""Autoregressive methods: the model reads the prompt and writes the target; loss on the target only.

Sequences follow the implicit-CoT repos: ` prompt <eos> cot <eos> #### answer <eos>` for explicit CoT
and ` prompt <eos> #### answer <eos>` without it (reference/icot.md §1.3), so a GPT-2 BPE tokenizer
reproduces their token ids exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from reasonlab.tasks import Example

IGNORE = -100


@dataclass
class MethodParams:
    """A method's section of the job file; methods with options subclass it."""
    name: str = "cot"

    def check(self) -> None:
        pass


class AutoregressiveMethod:
    """Base of `nocot` and `cot`: subclasses say what the target text is."""

    Params = MethodParams
    name = ""
    eos_in_target = 1  # decoding stops after this many EOS tokens
    examples_per_row = 1  # examples packed into one training row

    def __init__(self, params: MethodParams | None = None) -> None:
        self.params = params or self.Params(name=self.name)

    def target_text(self, example: Example, eos: str) -> str:
        raise NotImplementedError

    def build_model(self, cfg, tokenizer, max_len: int, device: torch.device):
        """A causal LM from the `model:` section (or its `pretrained` path): what this method trains."""
        from reasonlab.models.causal import build_causal_lm

        return build_causal_lm(cfg, len(tokenizer), max_len, tokenizer.eos_token_id, device)

    def prompt_text(self, example: Example, eos: str) -> str:
        return f" {example.prompt} {eos}"

    def encode(self, examples: list[Example], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
        """Token ids, labels (−100 outside the target), attention mask; right-padded to seq_len."""
        eos = tokenizer.eos_token
        texts = [self.prompt_text(e, eos) + self.target_text(e, eos) for e in examples]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        n = len(encoded)
        input_ids = np.full((n, seq_len), tokenizer.eos_token_id, dtype=np.int64)
        labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
        mask = np.zeros((n, seq_len), dtype=np.int64)
        for row, ids in enumerate(encoded):
            ids = ids[:seq_len]
            length = len(ids)
            input_ids[row, :length] = ids
            mask[row, :length] = 1
            start = ids.index(tokenizer.eos_token_id) + 1  # the target starts after the prompt's EOS
            labels[row, start:length] = ids[start:]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over target tokens (labels shifted by one)."""
        width = int(batch["attention_mask"].sum(1).max())  # drop all-padding columns
        logits = model(input_ids=batch["input_ids"][:, :width],
                       attention_mask=batch["attention_mask"][:, :width]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:width].flatten(),
                               ignore_index=IGNORE)

    def answer(self, generated: str, eos: str) -> str:
        """The answer in a decoded target: the text after the last `####` of the part before the
        final EOS, commas stripped, whitespace normalized."""
        parts = generated.split(eos)
        body = parts[self.eos_in_target - 1] if len(parts) >= self.eos_in_target else generated
        if "####" not in body:
            return ""
        return " ".join(body.rpartition("####")[2].replace(",", "").split())


class NoCoT(AutoregressiveMethod):
    name = "nocot"
    eos_in_target = 1

    def target_text(self, example: Example, eos: str) -> str:
        return f" #### {example.answer} {eos}"


class ExplicitCoT(AutoregressiveMethod):
    name = "cot"
    eos_in_target = 2

    def target_text(self, example: Example, eos: str) -> str:
        return f" {example.cot} {eos} #### {example.answer} {eos}"
