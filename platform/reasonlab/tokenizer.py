"""Task vocabularies → a transformers `PreTrainedTokenizerFast`, built with `tokenizers`.

Closed-vocabulary tasks (multiplication) get a word-level tokenizer over their whitespace-separated
tokens; open-text tasks (GSM8K) get a byte-level BPE trained on their corpus, with digits split one per
token. `<|endoftext|>` is BOS, EOS and padding, as in GPT-2 and the implicit-CoT repos.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from reasonlab.tasks import Task

EOS = "<|endoftext|>"
UNK = "<unk>"


def build_tokenizer(task: Task) -> PreTrainedTokenizerFast:
    vocab = task.vocabulary()
    if vocab is not None:
        ids = {tok: i for i, tok in enumerate([EOS, UNK, *vocab])}
        tok = Tokenizer(models.WordLevel(ids, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=task.params.vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(task.corpus(), trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
        unk_token=UNK if tok.token_to_id(UNK) is not None else None,
    )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The tokenizer's saved files, small enough to ship to Ray workers inside the loop config."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, bytes]) -> PreTrainedTokenizerBase:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        return load_tokenizer(d)
