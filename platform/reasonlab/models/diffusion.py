"""The diffusion transformer: a bidirectional DDiT (SEDD's model, MDLM's `dit.py`) as a transformers model.

Pre-LN blocks with rotary positions, attention through PyTorch SDPA with no causal mask, LayerNorm in
fp32, and optional time conditioning on σ(t) through adaLN whose modulation starts at zero (DiT's
adaLN-Zero: every block is the identity at initialization). The output layer also starts at zero, so
an untrained model predicts the uniform distribution. The output has one logit per state of the
forward process: the vocabulary, plus the mask state for the absorbing graph.

Being a `PreTrainedModel`, it saves with `save_pretrained` and loads with
`DiffusionTransformer.from_pretrained(path)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class DiffusionTransformerConfig(PretrainedConfig):
    model_type = "reasonlab_ddit"

    def __init__(
        self,
        vocab_size: int = 32,
        num_states: int | None = None,  # default vocab_size + 1: tokens and the absorbing mask state
        d_model: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        d_ff: int | None = None,  # default 4 * d_model
        dropout: float = 0.0,
        max_len: int = 1024,
        time_conditioning: bool = False,  # False: the model never sees σ (MDLM's time-agnostic default)
        cond_dim: int = 128,
        positions: str = "rotary",  # "rotary" (SEDD) or "learned" (a max_len × d_model table)
        rope_base: float = 10000.0,
        **kwargs,
    ) -> None:
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        if positions not in ("rotary", "learned"):
            raise ValueError(f"positions must be 'rotary' or 'learned', got {positions!r}")
        self.vocab_size = vocab_size
        self.num_states = num_states if num_states is not None else vocab_size + 1
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_ff = d_ff or 4 * d_model
        self.dropout = dropout
        self.max_len = max_len
        self.time_conditioning = time_conditioning
        self.cond_dim = cond_dim
        self.positions = positions
        self.rope_base = rope_base
        # the head and the embedding have the same shape, but are separate weights (transformers 4
        # ties such pairs unless told not to)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in fp32: bf16 statistics drift over long training (SEDD)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def rotary_tables(length: int, head_dim: int, base: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position × frequency, [length, head_dim/2]. Recomputed per call: it is tiny, and
    a buffer would have to survive transformers' meta-device loading."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's features (x: [B, H, L, hd]); attention scores then depend
    on relative positions only."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TimestepEmbedder(nn.Module):
    """σ → sinusoidal features (256) → MLP → cond_dim (SEDD conditions on σ(t), not on t)."""

    def __init__(self, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.float()[:, None] * freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class Block(nn.Module):
    def __init__(self, config: DiffusionTransformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.norm1 = LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, config.d_ff), nn.GELU(approximate="tanh"), nn.Linear(config.d_ff, d))
        self.drop = nn.Dropout(config.dropout)
        # shift, scale, gate for attention and MLP; zero-init so each block starts as the identity
        self.adaln = nn.Linear(config.cond_dim, 6 * d) if config.time_conditioning else None
        if self.adaln is not None:
            self.adaln.zero_init = True

    def forward(self, x, rotary, c, attn_mask):
        B, L, d = x.shape
        if self.adaln is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c).to(x.dtype).chunk(6, dim=-1)
            h = modulate(self.norm1(x), shift1, scale1)
        else:
            h = self.norm1(x)
        q, k, v = self.qkv(h).view(B, L, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False,
                                           dropout_p=self.dropout if self.training else 0.0)
        a = self.drop(self.proj(a.transpose(1, 2).reshape(B, L, d)))
        if self.adaln is None:
            x = x + a
            return x + self.drop(self.mlp(self.norm2(x)))
        x = x + gate1[:, None] * a
        return x + gate2[:, None] * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class DiffusionTransformer(PreTrainedModel):
    """Logits over the forward process's states for every position of a partly noised sequence."""

    config_class = DiffusionTransformerConfig
    base_model_prefix = "ddit"
    _supports_sdpa = True

    def __init__(self, config: DiffusionTransformerConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.embed = nn.Embedding(config.num_states, d)
        self.pos_embed = nn.Embedding(config.max_len, d) if config.positions == "learned" else None
        self.sigma_embed = TimestepEmbedder(config.cond_dim) if config.time_conditioning else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_out = LayerNorm(d)
        self.adaln_out = nn.Linear(config.cond_dim, 2 * d) if config.time_conditioning else None
        self.head = nn.Linear(d, config.num_states)
        self.head.zero_init = True
        if self.adaln_out is not None:
            self.adaln_out.zero_init = True
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, LayerNorm):
            nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, sigma: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> MaskedLMOutput:
        """input_ids: [B, L] states; sigma: [B] total noise σ(t), ignored unless the model is
        time-conditioned; attention_mask: [B, L], 1 on positions that may be attended to (None: all)."""
        B, L = input_ids.shape
        x = self.embed(input_ids)
        rotary = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(L, device=input_ids.device))
        else:
            rotary = rotary_tables(L, self.config.d_model // self.config.n_head, self.config.rope_base,
                                   input_ids.device, x.dtype)
        c = None
        if self.sigma_embed is not None:
            if sigma is None:
                raise ValueError("this model is time-conditioned: pass sigma, the total noise σ(t) per sequence")
            c = F.silu(self.sigma_embed(sigma.reshape(-1).expand(B)))
        # no mask when every position is real: SDPA can then pick its flash kernel on CUDA
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            attn_mask = attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, rotary, c, attn_mask)
        h = self.norm_out(x)
        if self.adaln_out is not None:
            shift, scale = self.adaln_out(c).to(h.dtype).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return MaskedLMOutput(logits=self.head(h))


def build_diffusion_lm(cfg, vocab_size: int, max_len: int, *, graph: str = "absorbing",
                       time_conditioning: bool | None = None, device: torch.device | None = None,
                       **overrides) -> DiffusionTransformer:
    """A fresh DDiT sized by a `ModelConfig` (n_layer, d_model, n_head, d_ff, dropout, max_len), or
    `cfg.pretrained` loaded from a local path or hub id.

    The output covers the vocabulary plus a mask state for the absorbing graph, the vocabulary alone
    for the uniform one. Time conditioning defaults to off for absorbing (the denoiser does not need
    t: MDLM, RADD) and on for uniform, whose score depends on σ. `cfg.arch` and `cfg.attention` do not
    apply: attention is always SDPA, which picks flash or memory-efficient kernels itself.
    """
    num_states = vocab_size + 1 if graph == "absorbing" else vocab_size
    if cfg.pretrained:
        model = DiffusionTransformer.from_pretrained(cfg.pretrained)
        if model.config.num_states != num_states:
            raise ValueError(f"{cfg.pretrained}: {model.config.num_states} output states, but a {graph} graph "
                             f"over {vocab_size} tokens needs {num_states}")
    else:
        if time_conditioning is None:
            time_conditioning = graph != "absorbing"
        config = DiffusionTransformerConfig(
            vocab_size=vocab_size, num_states=num_states, d_model=cfg.d_model, n_layer=cfg.n_layer,
            n_head=cfg.n_head, d_ff=cfg.d_ff, dropout=cfg.dropout, max_len=cfg.max_len or max_len,
            time_conditioning=time_conditioning, **overrides,
        )
        model = DiffusionTransformer(config)
    return model.to(device) if device is not None else model
