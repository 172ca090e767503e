"""The Llama 3 decoder: parameters, forward pass and its pieces."""

from jaxllm.model.decode import DecodeParams, prepare_decode_params
from jaxllm.model.layers import MASK_VALUE, MLP, Attention, Block, RMSNorm
from jaxllm.model.rope import apply_rope, rope_angles, rope_inverse_frequencies
from jaxllm.model.transformer import (
    Transformer,
    count_params,
    forward,
    init_params,
    param_shapes,
    positions_from_mask,
)

__all__ = [
    "MASK_VALUE",
    "MLP",
    "Attention",
    "Block",
    "DecodeParams",
    "RMSNorm",
    "Transformer",
    "apply_rope",
    "count_params",
    "forward",
    "init_params",
    "param_shapes",
    "positions_from_mask",
    "prepare_decode_params",
    "rope_angles",
    "rope_inverse_frequencies",
]
