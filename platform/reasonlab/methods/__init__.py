"""Method registry: a new method is one module plus one line here."""
from reasonlab.methods.autoregressive import IGNORE, AutoregressiveMethod, ExplicitCoT, NoCoT

METHODS = {
    "nocot": NoCoT,
    "cot": ExplicitCoT,
}


def make_method(params):
    return METHODS[params.name]()


def sequence_length(task, method, tokenizer) -> int:
    """Padded length: the longest encoded example of the task's length probe."""
    eos = tokenizer.eos_token
    texts = [method.prompt_text(e, eos) + method.target_text(e, eos) for e in task.length_probe()]
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def target_length(task, method, tokenizer) -> int:
    """Longest held-out target in tokens: how far decoding may need to go."""
    eos = tokenizer.eos_token
    texts = [method.target_text(e, eos) for s in ("valid", "test") for e in task.heldout(s)]
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


__all__ = ["IGNORE", "METHODS", "AutoregressiveMethod", "make_method", "sequence_length", "target_length"]
