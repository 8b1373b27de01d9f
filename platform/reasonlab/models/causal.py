"""GPT-2 and Llama causal LMs from a `ModelConfig`; attention picked by device."""
from __future__ import annotations

import importlib.util

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel


def attention_implementation(requested: str, device: torch.device) -> str:
    """`auto` → flash_attention_2 on CUDA when flash-attn is installed, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_causal_lm(cfg, vocab_size: int, max_len: int, eos_id: int, device: torch.device) -> PreTrainedModel:
    """A fresh model of `cfg.arch`, or `cfg.pretrained` loaded from a local path or hub id, on `device`."""
    attn = attention_implementation(cfg.attention, device)
    if cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(cfg.pretrained, attn_implementation=attn).to(device)
    config = causal_config(cfg, vocab_size, max_len, eos_id)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(device)


def causal_config(cfg, vocab_size: int, max_len: int, eos_id: int):
    d_ff = cfg.d_ff or 4 * cfg.d_model
    common = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    if cfg.arch == "gpt2":
        config = GPT2Config(
            n_positions=max_len, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=d_ff,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **common,
        )
    else:
        config = LlamaConfig(
            max_position_embeddings=max_len, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, intermediate_size=d_ff,
            attention_dropout=cfg.dropout, tie_word_embeddings=True, **common,
        )
    return config


HEAD_SIZE = 16  # head size when a model is sized by parameter count (EleutherAI's sizing)


def size_for_params(cfg, build) -> tuple[int, int]:
    """(d_model, n_head) of the `cfg.n_layer`-layer model whose parameter count is nearest
    `cfg.n_params`, d_model a multiple of the head size. `build(model_cfg)` makes the model (causal or
    diffusion); it is built on the meta device, so no memory is allocated."""
    import dataclasses

    def count(d: int) -> int:
        sized = dataclasses.replace(cfg, d_model=d, n_head=d // HEAD_SIZE, d_ff=None)
        with torch.device("meta"):
            return count_parameters(build(sized))

    lo, hi = 1, 512  # in head sizes: d_model from 16 to 8192; count grows with d
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid * HEAD_SIZE) <= cfg.n_params:
            lo = mid
        else:
            hi = mid - 1
    best = min((lo, lo + 1), key=lambda k: abs(count(k * HEAD_SIZE) - cfg.n_params))
    return best * HEAD_SIZE, best


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_used_parameters(model: PreTrainedModel, used_token_ids) -> int:
    """Parameters without the embedding rows of tokens the task never uses (Allen-Zhu & Li's count):
    those rows are never trained and store nothing. An untied output layer loses the same rows."""
    n = count_parameters(model)
    tables = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
              if m is not None}
    unused = model.get_input_embeddings().weight.shape[0] - len(set(used_token_ids))
    return n - sum(unused * w.shape[1] for w in tables.values())
