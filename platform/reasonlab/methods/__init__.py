"""Method registry: a new method is one module plus one line here."""
from reasonlab.methods.autoregressive import IGNORE, AutoregressiveMethod, ExplicitCoT, MethodParams, NoCoT
from reasonlab.methods.diffusion import DiffusionMethod
from reasonlab.methods.qa import AnswerOnly

METHODS = {
    "nocot": NoCoT,
    "cot": ExplicitCoT,
    "qa": AnswerOnly,
    "diffusion": DiffusionMethod,
}


def make_method(params):
    return METHODS[params.name](params)


def is_diffusion(method) -> bool:
    """Diffusion methods generate the whole target at once (`generate_text`); the others decode token by token."""
    return hasattr(method, "generate_text")


def _longest(tokenizer, texts: list[str]) -> int:
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _heldout(task):
    return [e for split in ("valid", "test") for e in task.heldout(split)]


def example_length(task, method, tokenizer) -> int:
    """Tokens of the longest encoded example of the task's length probe."""
    eos = tokenizer.eos_token
    texts = [method.prompt_text(e, eos) + method.target_text(e, eos) for e in task.length_probe(tokenizer)]
    return _longest(tokenizer, texts)


def sequence_length(task, method, tokenizer) -> int:
    """Padded length of one training row (which may pack several examples)."""
    return method.examples_per_row * example_length(task, method, tokenizer)


def prompt_length(task, method, tokenizer) -> int:
    """Longest held-out or probe prompt in tokens."""
    examples = [*_heldout(task), *task.length_probe(tokenizer)]
    return _longest(tokenizer, [method.prompt_text(e, tokenizer.eos_token) for e in examples])


def target_length(task, method, tokenizer) -> int:
    """Longest held-out or probe target in tokens: how far decoding may need to go."""
    examples = [*_heldout(task), *task.length_probe(tokenizer)]
    return _longest(tokenizer, [method.target_text(e, tokenizer.eos_token) for e in examples])


__all__ = ["IGNORE", "METHODS", "AutoregressiveMethod", "MethodParams", "example_length", "is_diffusion", "make_method",
           "prompt_length", "sequence_length", "target_length"]
