"""Method registry: a new method is one module plus one line here."""
from reasonlab.methods.autoregressive import AutoregressiveMethod, ExplicitCoT, NoCoT
from reasonlab.methods.base import IGNORE, Method, MethodParams
from reasonlab.methods.diffusion import DiffusionMethod
from reasonlab.methods.distill import KDCoupled, KDEmulator, KDStudent
from reasonlab.methods.internalize import StepwiseInternalization
from reasonlab.methods.qa import AnswerOnly

METHODS: dict[str, type[Method]] = {
    "nocot": NoCoT,
    "cot": ExplicitCoT,
    "qa": AnswerOnly,
    "diffusion": DiffusionMethod,
    "internalize": StepwiseInternalization,
    "kd_student": KDStudent,  # ICoT-KD's three stages after an explicit-CoT teacher (jobs/icot_kd.yaml)
    "kd_emulator": KDEmulator,
    "kd_coupled": KDCoupled,
}


def make_method(params, cfg=None) -> Method:
    """The method of a job's `method:` section; `cfg` (the whole job) for schedules counted in steps."""
    return METHODS[params.name](params, cfg)


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


__all__ = ["IGNORE", "METHODS", "AutoregressiveMethod", "Method", "MethodParams", "example_length", "make_method",
           "prompt_length", "sequence_length", "target_length"]
