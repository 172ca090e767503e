"""The Llama 3 decoder: parameters, forward pass and its pieces."""

from jaxllm.model.layers import MASK_VALUE, MLP, Attention, Block, RMSNorm
from jaxllm.model.rope import apply_rope, rope_angles, rope_inverse_frequencies
from jaxllm.model.transformer import (
    Transformer,
    count_params,
    forward,
    init_params,
    param_shapes,
    positions_from_mask,
    unstack_layers,
)

__all__ = [
    "MASK_VALUE",
    "MLP",
    "Attention",
    "Block",
    "RMSNorm",
    "Transformer",
    "apply_rope",
    "count_params",
    "forward",
    "init_params",
    "param_shapes",
    "positions_from_mask",
    "rope_angles",
    "rope_inverse_frequencies",
    "unstack_layers",
]
