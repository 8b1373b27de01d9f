"""Method registry: a new method is one module plus one line here."""
from reasonlab.methods.autoregressive import IGNORE, AutoregressiveMethod, ExplicitCoT, NoCoT

METHODS = {
    "nocot": NoCoT,
    "cot": ExplicitCoT,
}


def make_method(params):
    return METHODS[params.name]()


def _longest(tokenizer, texts: list[str]) -> int:
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _heldout(task):
    return [e for split in ("valid", "test") for e in task.heldout(split)]


def sequence_length(task, method, tokenizer) -> int:
    """Padded length: the longest encoded example of the task's length probe."""
    eos = tokenizer.eos_token
    texts = [method.prompt_text(e, eos) + method.target_text(e, eos) for e in task.length_probe()]
    return _longest(tokenizer, texts)


def prompt_length(task, method, tokenizer) -> int:
    """Longest held-out prompt in tokens."""
    return _longest(tokenizer, [method.prompt_text(e, tokenizer.eos_token) for e in _heldout(task)])


def target_length(task, method, tokenizer) -> int:
    """Longest held-out target in tokens: how far decoding may need to go."""
    return _longest(tokenizer, [method.target_text(e, tokenizer.eos_token) for e in _heldout(task)])


__all__ = ["IGNORE", "METHODS", "AutoregressiveMethod", "make_method", "prompt_length", "sequence_length",
           "target_length"]
