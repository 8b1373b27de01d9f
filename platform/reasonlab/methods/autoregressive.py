"""Autoregressive methods: the model reads the prompt and writes the target; loss on the target only.

Sequences follow the implicit-CoT repos: ` prompt <eos> cot <eos> #### answer <eos>` for explicit CoT
and ` prompt <eos> #### answer <eos>` without it (reference/icot.md §1.3), so a GPT-2 BPE tokenizer
reproduces their token ids exactly.

`method.pack=k` packs k examples per training row (`pack_rows`) so that short rows fill a GPU. Packed
examples do not see each other: position ids restart at 0 for every example and no 2-D attention mask is
passed, from which transformers builds a block-diagonal causal mask for SDPA and variable-length attention
for flash-attn. The loss per target token is the same as in a row of its own.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import StaticCache

from reasonlab.errors import ConfigError
from reasonlab.methods.base import IGNORE, Method, MethodParams
from reasonlab.tasks import Example


class _NoMaskOnPurpose(logging.Filter):
    """transformers warns once that no attention mask came with padded ids; here none is passed on purpose
    (module docstring), and its warning says so itself when pad and EOS are one token, as here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "your input_ids may be padded" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_NoMaskOnPurpose())


@dataclass
class AutoregressiveParams(MethodParams):
    pack: int = 1  # examples per training row; packed examples never attend to each other

    def check(self) -> None:
        if self.pack < 1:
            raise ConfigError(f"method.pack: expected a value > 0, got {self.pack}")


def pack_rows(sequences: list[list[int]], target_starts: list[int], per_row: int, eos_id: int,
              seq_len: int) -> dict[str, np.ndarray]:
    """Rows of `per_row` consecutive token sequences, right-padded with EOS to `seq_len`: input ids, labels
    from each sequence's target start on (−100 elsewhere), position ids restarting at 0 for every sequence,
    and the mask of real (non-padding) tokens. Padding at a row's end is one more block of its own, so its
    positions stay inside the position table too."""
    if len(sequences) % per_row:
        raise ValueError(f"{len(sequences)} examples do not fill rows of {per_row}")
    rows = len(sequences) // per_row
    input_ids = np.full((rows, seq_len), eos_id, dtype=np.int64)
    labels = np.full((rows, seq_len), IGNORE, dtype=np.int64)
    position_ids = np.zeros((rows, seq_len), dtype=np.int64)
    mask = np.zeros((rows, seq_len), dtype=np.int64)
    start = 0
    for i, (ids, target_start) in enumerate(zip(sequences, target_starts)):
        row, slot = divmod(i, per_row)
        if slot == 0:
            start = 0
        stop = start + len(ids)
        if stop > seq_len:
            raise ValueError(f"a row of {per_row} examples needs more than {seq_len} tokens; the task's length "
                             f"probe missed a longer example (example {i} of this batch)")
        input_ids[row, start:stop] = ids
        labels[row, start + target_start:stop] = ids[target_start:]
        position_ids[row, start:stop] = np.arange(len(ids))
        mask[row, start:stop] = 1
        start = stop
        if slot == per_row - 1:
            position_ids[row, stop:] = np.arange(seq_len - stop)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


DECODERS = ("dynamic", "static")  # eval.decoder: how `decode` keeps its KV cache
STATIC_CACHE_BLOCK = 64  # static caches are sized in blocks, so a few shapes serve every batch


class DynamicCacheSteps:
    """The forward passes of `decode` with transformers' default cache, which grows by one slot per token (a
    new shape every step): the 2-D mask grows with it."""

    def __init__(self, model, batch_size: int, prompt_len: int, max_new_tokens: int) -> None:
        self.model = model

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """The prompts' pass → logits of the first new token."""
        self.attention_mask = attention_mask
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1]

    def next(self, token: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row → logits of the next."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(token), 1)], 1)
        out = self.model(input_ids=token[:, None], attention_mask=self.attention_mask, position_ids=position_ids,
                         cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1]


def _static_step(model, token, attention_mask, position_ids, cache_position, cache) -> torch.Tensor:
    return model(input_ids=token, attention_mask=attention_mask, position_ids=position_ids,
                 cache_position=cache_position, cache=cache, use_cache=True).logits[:, -1]


@functools.cache
def _graphed_static_step():
    """`_static_step` compiled for CUDA graphs (built once: compiled code and graphs are kept per shape)."""
    return torch.compile(_static_step, mode="reduce-overhead", fullgraph=True)


_static_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {(rows, slots, autocast): cache}


class StaticCacheSteps:
    """The forward passes of `decode` with a preallocated cache (transformers' StaticCache) reused across calls:
    every step after the prompt has the same shapes and buffers (one token per row, a mask over all the cache's
    slots, of which the causal mask hides those not written yet), so on CUDA the step is compiled with
    `mode="reduce-overhead"`: CUDA graphs replay it without a kernel launch per operation. Elsewhere it runs
    eagerly and saves only the cache's reallocation."""

    def __init__(self, model, batch_size: int, prompt_len: int, max_new_tokens: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        slots = -(-(prompt_len + max_new_tokens) // STATIC_CACHE_BLOCK) * STATIC_CACHE_BLOCK
        key = (batch_size, slots, torch.is_autocast_enabled(self.device.type))
        caches = _static_caches.setdefault(model, {})
        if key not in caches:
            caches[key] = StaticCache(config=model.config, max_cache_len=slots)
        self.cache, self.slots = caches[key], slots
        self.graphed = self.device.type == "cuda"
        self.step = _graphed_static_step() if self.graphed else _static_step

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        self.written = input_ids.shape[1]
        self.attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(input_ids),
                                                                                  self.slots - self.written)], 1)
        return self.model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                          cache_position=torch.arange(self.written, device=self.device), cache=self.cache,
                          use_cache=True).logits[:, -1]

    def next(self, token: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        cache_position = torch.full((1,), self.written, dtype=torch.long, device=self.device)
        self.written += 1
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are read already
        return self.step(self.model, token[:, None], self.attention_mask, position_ids, cache_position, self.cache)


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           eos_id: int, stop_after: int, generator: torch.Generator | None = None,
           decoder: str = "dynamic", prefill: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Greedy continuation of left-padded prompts with the KV cache (`decoder`: `dynamic`, transformers'
    growing cache, or `static`, a preallocated one: the same tokens); row i stops once it has written
    `stop_after` EOS tokens (explicit-CoT targets hold two) and then emits EOS as padding. With a
    `generator`, tokens are sampled from the model's distribution instead (temperature 1). `prefill` is
    active during the prompt's forward only (ICoT-KD substitutes states there; later tokens see them
    through the cache)."""
    steps = (StaticCacheSteps if decoder == "static" else DynamicCacheSteps)(
        model, input_ids.shape[0], input_ids.shape[1], max_new_tokens)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with prefill or contextlib.nullcontext():
        logits = steps.prefill(input_ids, attention_mask, position_ids)
    eos_seen = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    generated = []
    for _ in range(max_new_tokens):
        if generator is None:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)[:, 0]
        token = torch.where(eos_seen >= stop_after, torch.full_like(token, eos_id), token)
        generated.append(token)
        eos_seen += token == eos_id
        if bool((eos_seen >= stop_after).all()):
            break
        position_ids = position_ids[:, -1:] + 1
        logits = steps.next(token, position_ids)
    return torch.stack(generated, 1)


class AutoregressiveMethod(Method):
    """Base of `nocot`, `cot` and the methods built on them: subclasses say what the target text is."""
    Params = AutoregressiveParams
    packs: ClassVar[bool] = True  # `method.pack` applies (methods whose rows carry more than tokens say no)

    def __init__(self, params: AutoregressiveParams | None = None, cfg=None) -> None:
        super().__init__(params, cfg)
        self.examples_per_row = self.params.pack if self.packs else 1

    def token_ids(self, examples: list[Example], tokenizer) -> list[list[int]]:
        """Each example's ` prompt <eos> target` as token ids."""
        eos = tokenizer.eos_token
        texts = [self.prompt_text(e, eos) + self.target_text(e, eos) for e in examples]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, examples: list[Example], tokenizer, seq_len: int, indices=None) -> dict[str, np.ndarray]:
        """Rows of `method.pack` examples (`pack_rows`), labels on each target."""
        return self.rows(self.token_ids(examples, tokenizer), tokenizer.eos_token_id, seq_len)

    def rows(self, encoded: list[list[int]], eos_id: int, seq_len: int) -> dict[str, np.ndarray]:
        """` prompt <eos> target` token ids → packed rows, the target starting after the prompt's EOS."""
        return pack_rows(encoded, [ids.index(eos_id) + 1 for ids in encoded], self.examples_per_row, eos_id,
                         seq_len)

    @staticmethod
    def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last layer's states of the batch's rows, cut to their longest real content. Position ids and no
        2-D mask: transformers then keeps packed examples apart (module docstring); padding only ever
        follows real tokens, so a causal model's real positions never see it."""
        width = int(batch["attention_mask"].sum(1).max())  # drop all-padding columns
        return model.base_model(input_ids=batch["input_ids"][:, :width],
                                position_ids=batch["position_ids"][:, :width], use_cache=False).last_hidden_state

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.get_output_embeddings()(self.hidden_states(model, batch))

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Mean cross-entropy over target tokens (labels shifted by one)."""
        logits = self.logits(model, batch)
        labels = batch["labels"][:, 1:logits.shape[1]]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE), {}

    def generate_text(self, model, tokenizer, examples: list[Example], *, max_new_tokens: int, seq_len: int | None,
                      device: torch.device, generator: torch.Generator, sample: bool = False,
                      steps: int | None = None, decoder: str = "dynamic") -> list[str]:
        """Token by token from the left-padded prompts, with the KV cache (`decode`)."""
        enc = self.prompt_batch(examples, tokenizer, device)
        out = decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                     eos_id=tokenizer.eos_token_id, stop_after=self.eos_in_target,
                     generator=generator if sample else None, decoder=decoder)
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
