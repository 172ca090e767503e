"""Eager PyTorch Llama 3 reference model that the JAX model is checked against."""

from torchref.config import LlamaConfig
from torchref.losses import cross_entropy
from torchref.model import (
    KVCache,
    Llama,
    apply_rope,
    greedy_generate,
    init_weights,
    rope_inverse_frequencies,
    scale_llama31_frequencies,
)

__all__ = [
    "KVCache",
    "Llama",
    "LlamaConfig",
    "apply_rope",
    "cross_entropy",
    "greedy_generate",
    "init_weights",
    "rope_inverse_frequencies",
    "scale_llama31_frequencies",
]
