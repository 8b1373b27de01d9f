"""Exact match of the answer, self-consistency votes and decoding throughput, for every method alike: the
method generates (`Method.generate_text`: token by token, or by diffusion), this module scores. No Ray here."""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from reasonlab.tasks import Example


@dataclass
class EvalResult:
    accuracy: float
    examples_per_sec: float
    num_examples: int
    predictions: list[dict]
    tokens_per_example: float = float("nan")  # generated up to the stop, EOS included (first sample)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/accuracy": self.accuracy, f"{prefix}/examples_per_sec": self.examples_per_sec,
                f"{prefix}/tokens_per_example": self.tokens_per_example}


def generated_tokens(texts: list[str], tokenizer, stop_after: int) -> list[int]:
    """Tokens each text holds up to its `stop_after`-th EOS (included): what decoding had to produce."""
    eos = tokenizer.eos_token
    kept = [eos.join(text.split(eos)[:stop_after]) for text in texts]  # the EOS tokens before the last stay
    ids = tokenizer(kept, add_special_tokens=False)["input_ids"]
    return [len(i) + (text.count(eos) >= stop_after) for i, text in zip(ids, texts)]


def autocast_context(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def vote(answers: list[str]) -> str:
    """Self-consistency: the most frequent non-empty answer; ties go to the one drawn first."""
    counts = Counter(a for a in answers if a)
    return max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else ""


class LastingBar:
    """`progress` for `evaluate`: a progress bar that appears only once an evaluation has run `after_s` seconds,
    so quick evaluations add no line. `bar` makes it (tqdm's by default; Ray workers pass Ray's, which the
    driver draws)."""

    def __init__(self, desc: str, after_s: float = 10.0, bar: Callable | None = None):
        self.desc, self.after_s, self.make = desc, after_s, bar
        self.start, self.done, self.bar = time.perf_counter(), 0, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None and time.perf_counter() - self.start >= self.after_s and done < total:
            if self.make is None:
                from tqdm import tqdm as make
            else:
                make = self.make
            self.bar = make(total=total, desc=self.desc, unit="ex")
            self.bar.update(done)
        elif self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        if self.bar is not None and done >= total:
            self.bar.close()


@torch.inference_mode()
def evaluate(model, tokenizer, method, examples: list[Example], *, batch_size: int, max_new_tokens: int,
             device: torch.device, precision: str = "auto", seq_len: int | None = None, steps: int | None = None,
             samples: int = 1, seed: int = 0, decoder: str = "dynamic",
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Generate every example's target (greedily, or `samples` times with a vote on the answer) and
    compare answers exactly. `progress(done, total)` is called after each batch (e.g. a `LastingBar`).

    Throughput counts everything from tokenizing the prompts to extracting the answers (all samples
    of a question included), as the implicit-CoT repos time it.
    """
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token
    # every random choice from one seeded generator: evaluations repeat exactly and never move the
    # training run's random state
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(seed)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))  # less padding per batch
    outputs: dict[int, list[str]] = {}
    start = time.perf_counter()
    for lo in range(0, len(order), batch_size):
        rows = order[lo: lo + batch_size]
        for i in rows:
            outputs[i] = []
        for _ in range(samples):
            with autocast_context(device, precision):
                texts = method.generate_text(model, tokenizer, [examples[i] for i in rows],
                                             max_new_tokens=max_new_tokens, seq_len=seq_len, device=device,
                                             generator=generator, sample=samples > 1, steps=steps,
                                             decoder=decoder)
            for i, text in zip(rows, texts):
                outputs[i].append(text)
        if progress is not None:
            progress(lo + len(rows), len(order))
    drawn = {i: [method.answer(text, eos) for text in texts] for i, texts in outputs.items()}
    answers = {i: vote(a) if samples > 1 else a[0] for i, a in drawn.items()}
    elapsed = time.perf_counter() - start
    model.train(was_training)
    predictions = []
    correct = 0
    for i, example in enumerate(examples):
        ok = answers[i] == " ".join(example.answer.split())
        correct += ok
        # the text of the first sample that gave the chosen answer
        shown = outputs[i][drawn[i].index(answers[i])] if answers[i] in drawn[i] else outputs[i][0]
        prediction = {"prompt": example.prompt, "answer": example.answer, "predicted": answers[i],
                      "correct": bool(ok), "generated": shown}
        if samples > 1:
            prediction["votes"] = drawn[i]
        predictions.append(prediction)
    n = len(examples)
    tokens = generated_tokens([outputs[i][0] for i in range(n)], tokenizer, method.eos_in_target)
    return EvalResult(correct / max(n, 1), n / elapsed if elapsed > 0 else float("inf"), n, predictions,
                      float(np.mean(tokens)) if tokens else float("nan"))


@torch.inference_mode()
def answer_losses(model, tokenizer, method, examples: list[Example], *, batch_size: int, device: torch.device,
                  precision: str = "auto") -> np.ndarray:
    """Each example's target loss in nats (teacher-forced, summed over the target's tokens)."""
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token
    prompts = tokenizer([method.prompt_text(e, eos) for e in examples], add_special_tokens=False)["input_ids"]
    targets = tokenizer([method.target_text(e, eos) for e in examples], add_special_tokens=False)["input_ids"]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]) + len(targets[i]))
    out = np.zeros(len(examples))
    for lo in range(0, len(order), batch_size):
        rows = order[lo: lo + batch_size]
        width = max(len(prompts[i]) + len(targets[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.eos_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            seq = prompts[i] + targets[i]
            ids[j, : len(seq)] = torch.tensor(seq)
            labels[j, len(prompts[i]): len(seq)] = torch.tensor(targets[i])
            mask[j, : len(seq)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with autocast_context(device, precision):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                       ignore_index=-100, reduction="none")
        out[rows] = token_loss.sum(1).double().cpu().numpy()
    model.train(was_training)
    return out
