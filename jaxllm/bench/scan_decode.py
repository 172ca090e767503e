"""Greedy decoding with the layers under `lax.scan`: the layout experiment of the decode benchmark.

`jaxllm.generate` unrolls the layers during decoding. This variant stacks the per-layer
decoding weights of `prepare_decode_params` on an L axis and scans over them, and keeps the
whole cache as one stacked [L, B, S, K, H] array in the scan carry. Each layer writes its new
key and value into the carry with `dynamic_update_slice` at (layer, 0, slot), so no per-layer
buffer is returned as a scan output and copied back.

The prefill runs through `forward` with the unrolled per-layer cache, which is then stacked
once, so only the decode steps differ from `generate`. Both run `decode_block`, and the decode
benchmark checks that they produce the same greedy tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import KVCache
from jaxllm.model import DecodeParams, forward
from jaxllm.model.decode import decode_block, final_logits
from jaxllm.model.rope import rope_angles, rope_inverse_frequencies


def stack_layers(decode_params: DecodeParams) -> dict:
    """Stack the per-layer decoding weights on a leading L axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *decode_params.layers)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "compute_dtype"))
def generate_greedy_scanned(
    decode_params: DecodeParams,
    stacked_layers: dict,
    prompt_tokens: jnp.ndarray,
    *,
    config: ModelConfig,
    max_new_tokens: int,
    compute_dtype: Any = jnp.float32,
) -> jnp.ndarray:
    """Greedily decode `max_new_tokens` tokens [B, N] after unpadded prompts [B, T].

    `stacked_layers` is `stack_layers(decode_params)`, made once outside.
    """
    B, T = prompt_tokens.shape
    S = T + max_new_tokens
    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    # 1. Prefill through the model's own cached forward, then stack the cache: [L, B, S, K, H].
    cache = KVCache.allocate(config, B, S, compute_dtype)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, cache = forward(decode_params, prompt_tokens, positions, config=config, cache=cache,
                            compute_dtype=compute_dtype)
    first_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    keys, values = jnp.stack(cache.keys), jnp.stack(cache.values)

    # 2. One decode step: embed, scan the layers over the stacked weights, pick the argmax.
    def decode_step(carry, _):
        keys, values, token, slot = carry
        x = decode_params.embed[token][:, None].astype(compute_dtype)
        cos, sin = rope_angles(jnp.full((B, 1), slot, jnp.int32), inv_freq)
        # The query at `slot` sees every slot up to and including its own.
        attn_mask = jnp.broadcast_to(jnp.arange(S) <= slot, (B, 1, S))

        def layer_step(layer_carry, layer):
            x, keys, values, index = layer_carry
            x, layer_keys, layer_values = decode_block(
                layer, x, cos, sin, attn_mask, keys[index], values[index], slot,
                config=config, dtype=compute_dtype,
            )
            new_key = jax.lax.dynamic_slice_in_dim(layer_keys, slot, 1, axis=1)
            new_value = jax.lax.dynamic_slice_in_dim(layer_values, slot, 1, axis=1)
            keys = jax.lax.dynamic_update_slice(keys, new_key[None], (index, 0, slot, 0, 0))
            values = jax.lax.dynamic_update_slice(values, new_value[None], (index, 0, slot, 0, 0))
            return (x, keys, values, index + 1), None

        layer_carry = (x, keys, values, jnp.zeros((), jnp.int32))
        (x, keys, values, _), _ = jax.lax.scan(layer_step, layer_carry, stacked_layers)
        logits = final_logits(decode_params, x, config)[:, 0]
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (keys, values, next_token, slot + 1), next_token

    carry = (keys, values, first_token, jnp.asarray(T, jnp.int32))
    _, tokens = jax.lax.scan(decode_step, carry, None, length=max_new_tokens - 1)
    return jnp.concatenate([first_token[:, None], tokens.T], axis=1)
