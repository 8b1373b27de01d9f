"""Autoregressive methods: the model reads the prompt and writes the target; loss on the target only.

Sequences follow the implicit-CoT repos: ` prompt <eos> cot <eos> #### answer <eos>` for explicit CoT
and ` prompt <eos> #### answer <eos>` without it (reference/icot.md §1.3), so a GPT-2 BPE tokenizer
reproduces their token ids exactly.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from reasonlab.methods.base import IGNORE, Method
from reasonlab.tasks import Example


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           eos_id: int, stop_after: int, generator: torch.Generator | None = None,
           prefill: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Greedy continuation of left-padded prompts with the KV cache; row i stops once it has written
    `stop_after` EOS tokens (explicit-CoT targets hold two) and then emits EOS as padding. With a
    `generator`, tokens are sampled from the model's distribution instead (temperature 1). `prefill` is
    active during the prompt's forward only (ICoT-KD substitutes states there; later tokens see them
    through the cache)."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with prefill or contextlib.nullcontext():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    eos_seen = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    generated = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1]
        if generator is None:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0]
        token = torch.where(eos_seen >= stop_after, torch.full_like(token, eos_id), token)
        generated.append(token)
        eos_seen += token == eos_id
        if bool((eos_seen >= stop_after).all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(generated, 1)


class AutoregressiveMethod(Method):
    """Base of `nocot`, `cot` and the methods built on them: subclasses say what the target text is."""

    def token_ids(self, examples: list[Example], tokenizer) -> list[list[int]]:
        """Each example's ` prompt <eos> target` as token ids."""
        eos = tokenizer.eos_token
        texts = [self.prompt_text(e, eos) + self.target_text(e, eos) for e in examples]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, examples: list[Example], tokenizer, seq_len: int, indices=None) -> dict[str, np.ndarray]:
        """Token ids, labels (−100 outside the target), attention mask; right-padded to seq_len."""
        return self.pad_rows(self.token_ids(examples, tokenizer), tokenizer.eos_token_id, seq_len)

    @staticmethod
    def pad_rows(encoded: list[list[int]], eos_id: int, seq_len: int) -> dict[str, np.ndarray]:
        """Rows of ` prompt <eos> target` token ids → right-padded ids, labels on everything after the
        first EOS, attention mask."""
        n = len(encoded)
        input_ids = np.full((n, seq_len), eos_id, dtype=np.int64)
        labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
        mask = np.zeros((n, seq_len), dtype=np.int64)
        for row, ids in enumerate(encoded):
            ids = ids[:seq_len]
            length = len(ids)
            input_ids[row, :length] = ids
            mask[row, :length] = 1
            start = ids.index(eos_id) + 1  # the target starts after the prompt's EOS
            labels[row, start:length] = ids[start:]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def logits(self, model, batch: dict[str, torch.Tensor], width: int) -> torch.Tensor:
        """The model's logits over the batch's first `width` columns."""
        return model(input_ids=batch["input_ids"][:, :width], attention_mask=batch["attention_mask"][:, :width]).logits

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Mean cross-entropy over target tokens (labels shifted by one)."""
        width = int(batch["attention_mask"].sum(1).max())  # drop all-padding columns
        logits = self.logits(model, batch, width)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:width].flatten(),
                               ignore_index=IGNORE)
        return loss, {}

    def generate_text(self, model, tokenizer, examples: list[Example], *, max_new_tokens: int, seq_len: int | None,
                      device: torch.device, generator: torch.Generator, sample: bool = False,
                      steps: int | None = None) -> list[str]:
        """Token by token from the left-padded prompts, with the KV cache."""
        enc = self.prompt_batch(examples, tokenizer, device)
        out = decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                     eos_id=tokenizer.eos_token_id, stop_after=self.eos_in_target,
                     generator=generator if sample else None)
        return tokenizer.batch_decode(out.tolist(), skip_special_tokens=False)

    def prompt_batch(self, examples: list[Example], tokenizer, device: torch.device) -> dict[str, torch.Tensor]:
        """The examples' ` prompt <eos>` token ids, left-padded (every prompt's EOS in the last column)."""
        eos = tokenizer.eos_token
        return tokenizer([self.prompt_text(e, eos) for e in examples], add_special_tokens=False, padding=True,
                         padding_side="left", return_tensors="pt", return_token_type_ids=False).to(device)


class NoCoT(AutoregressiveMethod):
    name = "nocot"
    eos_in_target = 1

    def target_text(self, example: Example, eos: str) -> str:
        return f" #### {example.answer} {eos}"


class ExplicitCoT(AutoregressiveMethod):
    name = "cot"
    needs_cot = True
    eos_in_target = 2

    def target_text(self, example: Example, eos: str) -> str:
        return f" {example.cot} {eos} #### {example.answer} {eos}"
