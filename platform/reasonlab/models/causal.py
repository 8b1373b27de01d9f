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
    """A fresh model of `cfg.arch`, or `cfg.pretrained` loaded from a local path or hub id."""
    attn = attention_implementation(cfg.attention, device)
    if cfg.pretrained:
        return AutoModelForCausalLM.from_pretrained(cfg.pretrained, attn_implementation=attn)
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
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
