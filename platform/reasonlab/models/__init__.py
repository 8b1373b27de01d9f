"""Causal language models built from config with transformers, or loaded with from_pretrained."""
from reasonlab.models.causal import attention_implementation, build_causal_lm, count_parameters

__all__ = ["attention_implementation", "build_causal_lm", "count_parameters"]
