"""Diffusion of Thoughts: discrete diffusion over the target, the prompt kept clean.

The pieces, each swappable by name (SEDD's split): `schedule` (σ(t)), `graph` (the forward process
and its score head), `loss` (score entropy, or the equal weighted cross-entropy), `sampler` (the
reverse process); the model is reasonlab.models.diffusion.

Sequences follow DoT-SEDD's layout with this project's texts (the prompt and target texts of
methods/autoregressive.py, so answers are extracted by the same rule):

    ` prompt <eos>`   ` cot <eos> #### answer <eos>` <eos> <eos> ... up to seq_len
     clamped           target: noised, scored and generated, the EOS padding included

The EOS padding belongs to the target, so the model also learns where the answer ends (DoT makes the
padding maskable). Every position is a real token, so the attention mask is all ones.

Multi-pass DoT (DoT-MP, `multipass=True`) generates one thought per diffusion run: the prompt of pass
j is the question followed by the thoughts generated so far, its target the next thought, and the
last pass writes `#### answer`. Passes stop at `####` or after `max_passes`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

from reasonlab.errors import ConfigError
from reasonlab.methods.base import Method
from reasonlab.methods.diffusion.graph import Absorbing, Graph, Uniform, make_graph
from reasonlab.methods.diffusion.loss import diffusion_loss
from reasonlab.methods.diffusion.sampler import sample
from reasonlab.methods.diffusion.schedule import Geometric, LogLinear, make_schedule
from reasonlab.tasks import TASKS, Example

DEFAULT_SCHEDULE = {"absorbing": "loglinear", "uniform": "geometric"}  # SEDD's pairings


def split_thoughts(cot: str) -> list[str]:
    """The thoughts of a chain, one per DoT-MP pass; joined with spaces they give the chain back.

    GSM8K-Aug chains are `<<equation>>` words, one thought each (DoT-SEDD splits on spaces).
    Multiplication chains: a thought is one partial product with its running sum (a split before
    each `+`). Other text: a thought is a sentence.
    """
    words = cot.split()
    if words and all(w.startswith("<<") and w.endswith(">>") for w in words):
        return words
    if "+" in words and all(w in "+()" or w.isdigit() for w in words):
        thoughts, current = [], []
        for w in words:
            if w == "+" and current:
                thoughts.append(" ".join(current))
                current = []
            current.append(w)
        return thoughts + [" ".join(current)]
    sentences, current = [], []
    for w in words:
        current.append(w)
        if w.endswith((".", "?", "!")):
            sentences.append(" ".join(current))
            current = []
    return sentences + ([" ".join(current)] if current else [])


def pass_prompt(prompt: str, thoughts: list[str], eos: str) -> str:
    """A DoT-MP pass's prompt: the question, then the thoughts so far."""
    return f" {' '.join([prompt, *thoughts])} {eos}"


def _stable_index(text: str, n: int) -> int:
    """A pass index in [0, n) that is a pure function of the text (the data stream is index-addressed,
    so no hidden random state may decide what a row contains)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % n


@dataclass
class DiffusionParams:
    """The `method:` section of a job file for `name: diffusion`."""
    name: str = "diffusion"
    graph: Literal["absorbing", "uniform"] = "absorbing"
    schedule: Optional[Literal["loglinear", "geometric"]] = None  # default: loglinear (absorbing), geometric (uniform)
    target: Literal["cot", "answer"] = "cot"  # cot: chain and answer, as in DoT; answer: the answer alone
    sampler: Literal["analytic", "euler", "confidence"] = "analytic"
    steps: int = 64  # T, sampling steps per diffusion run
    greedy: bool = True  # deterministic token choices when decoding (see sampler.py)
    loss_form: Literal["auto", "mdlm", "score_entropy"] = "auto"
    # absorbing only: "denoiser" = normalised p(x0|x_t) (MDLM; loss = weighted CE), "sedd" = SEDD's free log-ratios
    score_head: Literal["denoiser", "sedd"] = "denoiser"
    reduction: Literal["sum", "mean"] = "sum"  # sum over each target (SEDD) or mean per target token
    antithetic: bool = True  # evenly spread noise levels within a batch
    multipass: bool = False  # DoT-MP: one thought per diffusion run
    max_passes: int = 16
    time_conditioning: Optional[bool] = None  # for build_diffusion_lm; default off for absorbing, on for uniform

    def check(self) -> None:
        for key, allowed in (("graph", ("absorbing", "uniform")), ("schedule", (None, "loglinear", "geometric")),
                             ("target", ("cot", "answer")), ("sampler", ("analytic", "euler", "confidence")),
                             ("loss_form", ("auto", "mdlm", "score_entropy")), ("reduction", ("sum", "mean")),
                             ("score_head", ("denoiser", "sedd"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"method.{key}: expected one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.steps < 1 or self.max_passes < 1:
            raise ConfigError(f"method.steps, method.max_passes: expected values > 0, "
                              f"got {self.steps}, {self.max_passes}")
        if self.sampler == "confidence" and self.graph != "absorbing":
            raise ConfigError("method.sampler: 'confidence' unmasks tokens; it needs method.graph 'absorbing'")
        if self.loss_form == "mdlm" and (self.graph != "absorbing" or self.score_head != "denoiser"):
            raise ConfigError("method.loss_form: 'mdlm' (weighted cross-entropy) needs method.graph 'absorbing' "
                              "with method.score_head 'denoiser'")
        if self.multipass and self.target != "cot":
            raise ConfigError("method.multipass: one thought per pass needs method.target 'cot'")
        if self.graph == "uniform" and self.time_conditioning is False:
            raise ConfigError("method.time_conditioning: the uniform graph's score depends on σ(t); it cannot be off")


class DiffusionMethod(Method):
    """Masked (absorbing) or uniform discrete diffusion over the target; see the module docstring."""

    Params = DiffusionParams
    name = "diffusion"
    decoding = "parallel"
    teacher_forced = False  # a target's likelihood is a bound here, not the sum of token losses
    model_kind = "diffusion transformer"

    def __init__(self, params: DiffusionParams | None = None, cfg=None, **options) -> None:
        """`DiffusionMethod(params)` from a job file, or `DiffusionMethod(graph="uniform", steps=32)`."""
        super().__init__(params if params is not None else DiffusionParams(**options), cfg)
        self.params.check()
        p = self.params
        self.graph_name, self.target, self.sampler, self.steps = p.graph, p.target, p.sampler, p.steps
        self.schedule = make_schedule(p.schedule or DEFAULT_SCHEDULE[p.graph])
        self.greedy, self.loss_form, self.reduction, self.antithetic = p.greedy, p.loss_form, p.reduction, p.antithetic
        self.multipass, self.max_passes = p.multipass, p.max_passes
        # decoded targets hold two EOS with the chain written out in one pass, one otherwise
        self.eos_in_target = 2 if p.target == "cot" and not p.multipass else 1

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.method.target == "cot" and not TASKS[cfg.task.name].has_cot:
            raise ConfigError(f"method.target: 'cot' diffuses a chain of thought; task {cfg.task.name!r} has "
                              f"none (use method.target=answer)")

    # ---- texts: the autoregressive methods' conventions (prompt_text and answer are Method's) ----
    def target_text(self, example: Example, eos: str) -> str:
        """The single-pass target; with multipass it bounds every pass's length (sequence_length)."""
        if self.target == "answer":
            return f" #### {example.answer} {eos}"
        return f" {example.cot} {eos} #### {example.answer} {eos}"

    def pass_texts(self, example: Example, eos: str, done: int) -> tuple[str, str]:
        """DoT-MP pass `done` (0..k): prompt = question + the first `done` thoughts, target = the next
        thought, or `#### answer` after the last one."""
        thoughts = split_thoughts(example.cot)
        target = thoughts[done] if done < len(thoughts) else f"#### {example.answer}"
        return pass_prompt(example.prompt, thoughts[:done], eos), f" {target} {eos}"

    # ---- encoding ----
    def encode(self, examples: list[Example], tokenizer, seq_len: int, indices=None, *, with_target: bool = True
               ) -> dict[str, np.ndarray]:
        """input_ids [n, seq_len] (prompt, target, EOS padding), target_mask (1 where noised, scored and
        generated: everything after the prompt), attention_mask (all ones). `with_target=False` leaves
        the target out (EOS placeholders): what generation needs, with no answer to leak.

        With multipass, each example becomes one of its passes, picked by a hash of the example."""
        eos = tokenizer.eos_token
        if self.multipass:
            pairs = [self.pass_texts(e, eos, _stable_index(e.line(), len(split_thoughts(e.cot)) + 1))
                     for e in examples]
        else:
            pairs = [(self.prompt_text(e, eos), self.target_text(e, eos)) for e in examples]
        return self.encode_texts([p for p, _ in pairs], [t if with_target else "" for _, t in pairs],
                                 tokenizer, seq_len)

    @staticmethod
    def encode_texts(prompts: list[str], targets: list[str], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
        n = len(prompts)
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if n else []
        target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"] if n else []
        input_ids = np.full((n, seq_len), tokenizer.eos_token_id, dtype=np.int64)
        target_mask = np.zeros((n, seq_len), dtype=np.int64)
        for row, (p, t) in enumerate(zip(prompt_ids, target_ids)):
            ids = (p + t)[:seq_len]
            input_ids[row, : len(ids)] = ids
            target_mask[row, len(p):] = 1
        return {"input_ids": input_ids, "target_mask": target_mask,
                "attention_mask": np.ones((n, seq_len), dtype=np.int64)}

    # ---- the model ----
    def build_model(self, cfg, tokenizer, max_len: int, device: torch.device, inputs: dict | None = None):
        """A bidirectional diffusion transformer from the `model:` section (or its `pretrained` path)."""
        from reasonlab.models.diffusion import build_diffusion_lm

        return build_diffusion_lm(cfg, len(tokenizer), max_len, graph=self.graph_name,
                                  time_conditioning=self.params.time_conditioning, device=device)

    # ---- the forward process a model was built for ----
    def graph(self, vocab_size: int) -> Graph:
        return make_graph(self.graph_name, vocab_size, self.params.score_head)

    def graph_for(self, model) -> Graph:
        config = model.config
        graph = self.graph(config.vocab_size)
        if graph.dim != config.num_states:
            raise ValueError(f"the model has {config.num_states} output states; the {self.graph_name} graph over "
                             f"{config.vocab_size} tokens needs {graph.dim}")
        if not graph.absorbing and not config.time_conditioning:
            raise ValueError("the uniform graph's score depends on σ(t): build the model with time_conditioning")
        return graph

    # ---- training ----
    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return diffusion_loss(model, self.graph_for(model), self.schedule, batch["input_ids"], batch["target_mask"],
                              form=self.loss_form, reduction=self.reduction, antithetic=self.antithetic,
                              attention_mask=batch.get("attention_mask")), {}

    def extra_state_ids(self, tokenizer, model) -> range:
        return range(len(tokenizer), model.get_input_embeddings().weight.shape[0])

    def sampling_settings(self, steps: int | None) -> list[str]:
        return [f"T={steps or self.steps}", f"sampler {self.sampler}"]

    # ---- generation ----
    @torch.no_grad()
    def generate(self, model, batch: dict, *, steps: int | None = None, sampler: str | None = None,
                 greedy: bool | None = None, generator: torch.Generator | None = None,
                 callback=None) -> torch.Tensor:
        """Token ids [B, L]: the batch's prompt positions as given, its target positions generated
        (their content in the batch is never read). `batch` is `encode(...)`'s output, arrays or tensors."""
        device = next(model.parameters()).device
        ids = torch.as_tensor(batch["input_ids"], device=device)
        target = torch.as_tensor(batch["target_mask"], device=device).bool()
        was_training = model.training
        model.eval()
        try:
            return sample(model, self.graph_for(model), self.schedule, ids, target,
                          steps=steps or self.steps, sampler=sampler or self.sampler,
                          greedy=self.greedy if greedy is None else greedy, generator=generator,
                          callback=callback)
        finally:
            model.train(was_training)

    @staticmethod
    def decode_targets(tokenizer, ids, target_mask) -> list[str]:
        """The generated target of each row as text (EOS tokens kept: `answer` splits on them)."""
        ids, target_mask = torch.as_tensor(ids).cpu(), torch.as_tensor(target_mask).cpu().bool()
        return [tokenizer.decode(row[m].tolist(), skip_special_tokens=False) for row, m in zip(ids, target_mask)]

    def generate_text(self, model, tokenizer, examples: list[Example], *, max_new_tokens: int | None = None,
                      seq_len: int, device: torch.device | None = None, generator: torch.Generator | None = None,
                      sample: bool = False, steps: int | None = None, sampler: str | None = None,
                      decoder: str = "dynamic") -> list[str]:
        """Generated targets for the examples' prompts, as text for `answer`: the whole target at once in
        the training length, one diffusion run per example (or one per thought with multipass).
        `sample` draws tokens instead of the greedy choice; the samplers draw noise from `generator`
        even when greedy. `sampler` overrides method.sampler."""
        kwargs = {"steps": steps, "sampler": sampler, "generator": generator, **({"greedy": False} if sample else {})}
        if self.multipass:
            return self._generate_multipass(model, tokenizer, examples, seq_len, **kwargs)
        batch = self.encode(examples, tokenizer, seq_len, with_target=False)
        return self.decode_targets(tokenizer, self.generate(model, batch, **kwargs), batch["target_mask"])

    def _generate_multipass(self, model, tokenizer, examples, seq_len, **kwargs) -> list[str]:
        eos = tokenizer.eos_token
        thoughts: list[list[str]] = [[] for _ in examples]
        final = [""] * len(examples)
        active = list(range(len(examples)))
        for n_pass in range(self.max_passes):
            if not active:
                break
            prompts = [pass_prompt(examples[i].prompt, thoughts[i], eos) for i in active]
            batch = self.encode_texts(prompts, [""] * len(active), tokenizer, seq_len)
            texts = self.decode_targets(tokenizer, self.generate(model, batch, **kwargs), batch["target_mask"])
            still = []
            for i, text in zip(active, texts):
                piece = " ".join(text.split(eos)[0].split())  # this pass's thought, before its EOS
                if "####" in piece or not piece or n_pass == self.max_passes - 1:
                    final[i] = piece
                else:
                    thoughts[i].append(piece)
                    still.append(i)
            active = still
        return [f" {' '.join([*thoughts[i], final[i]])} {eos}" for i in range(len(examples))]


__all__ = ["Absorbing", "DiffusionMethod", "DiffusionParams", "Geometric", "LogLinear", "Uniform", "diffusion_loss",
           "make_graph", "make_schedule", "sample", "split_thoughts"]
