"""Generation (greedy, sampled, or by diffusion), exact match of the answer, self-consistency votes, and
decoding throughput. No Ray here."""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from reasonlab.methods import is_diffusion
from reasonlab.tasks import Example


@dataclass
class EvalResult:
    accuracy: float
    examples_per_sec: float
    num_examples: int
    predictions: list[dict]

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/accuracy": self.accuracy, f"{prefix}/examples_per_sec": self.examples_per_sec}


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           eos_id: int, stop_after: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy continuation of left-padded prompts with the KV cache; row i stops once it has written
    `stop_after` EOS tokens (explicit-CoT targets hold two) and then emits EOS as padding. With a
    `generator`, tokens are sampled from the model's distribution instead (temperature 1)."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
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


def autocast_context(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generate_targets(model, tokenizer, method, examples: list[Example], *, max_new_tokens: int, device: torch.device,
                     generator: torch.Generator, sample: bool = False, seq_len: int | None = None,
                     steps: int | None = None) -> list[str]:
    """Each example's generated target as text: token by token for autoregressive methods, in
    `steps` parallel denoising steps (method.steps by default) for diffusion methods. Greedy unless
    `sample`; `generator` draws every random choice (diffusion samplers make some even when greedy)."""
    if is_diffusion(method):  # the whole target at once, in the training length
        greedy = {"greedy": False} if sample else {}
        return method.generate_text(model, tokenizer, examples, seq_len, steps=steps, generator=generator, **greedy)
    eos = tokenizer.eos_token
    enc = tokenizer([method.prompt_text(e, eos) for e in examples], add_special_tokens=False, padding=True,
                    padding_side="left", return_tensors="pt", return_token_type_ids=False).to(device)
    out = decode(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                 eos_id=tokenizer.eos_token_id, stop_after=method.eos_in_target,
                 generator=generator if sample else None)
    return tokenizer.batch_decode(out.tolist(), skip_special_tokens=False)


def vote(answers: list[str]) -> str:
    """Self-consistency: the most frequent non-empty answer; ties go to the one drawn first."""
    counts = Counter(a for a in answers if a)
    return max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else ""


@torch.inference_mode()
def evaluate(model, tokenizer, method, examples: list[Example], *, batch_size: int, max_new_tokens: int,
             device: torch.device, precision: str = "auto", seq_len: int | None = None, steps: int | None = None,
             samples: int = 1, seed: int = 0) -> EvalResult:
    """Generate every example's target (greedily, or `samples` times with a vote on the answer) and
    compare answers exactly.

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
                texts = generate_targets(model, tokenizer, method, [examples[i] for i in rows],
                                         max_new_tokens=max_new_tokens, device=device, generator=generator,
                                         sample=samples > 1, seq_len=seq_len, steps=steps)
            for i, text in zip(rows, texts):
                outputs[i].append(text)
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
    return EvalResult(correct / max(n, 1), n / elapsed if elapsed > 0 else float("inf"), n, predictions)


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
