"""Greedy decoding with the layers under `lax.scan`: the layout experiment of the decode benchmark.

`jaxllm.generate` unrolls the layers during decoding. This variant scans over the stacked
layer parameters instead and keeps the whole cache as one stacked [L, B, S, K, H] array in the
scan carry. Each layer writes its new key and value into the carry with `dynamic_update_slice`
at (layer, 0, slot), so no per-layer buffer is returned as a scan output and copied back.

The prefill runs through `forward` with the unrolled per-layer cache, which is then stacked
once, so only the decode steps differ from `generate`. The embedding, final norm and head below
mirror `jaxllm.model.Transformer`; the decode benchmark checks that both produce the same
greedy tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import KVCache
from jaxllm.model import forward
from jaxllm.model.layers import Block, RMSNorm
from jaxllm.model.rope import rope_angles, rope_inverse_frequencies


def _logits(params, x, config: ModelConfig):
    """Final norm and LM head in float32: x [B, 1, D] -> logits [B, V]."""
    x = RMSNorm(config.norm_eps).apply({"params": params["final_norm"]}, x)[:, 0]
    if config.tie_embeddings:
        return x @ params["embed"]["embedding"].T
    return x @ params["lm_head"]


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "compute_dtype"))
def generate_greedy_scanned(
    params,
    prompt_tokens: jnp.ndarray,
    *,
    config: ModelConfig,
    max_new_tokens: int,
    compute_dtype: Any = jnp.float32,
) -> jnp.ndarray:
    """Greedily decode `max_new_tokens` tokens [B, N] after unpadded prompts [B, T]."""
    B, T = prompt_tokens.shape
    S = T + max_new_tokens
    block = Block(config, compute_dtype)
    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    # 1. Prefill through the model's own cached forward, then stack the cache: [L, B, S, K, H].
    cache = KVCache.allocate(config, B, S, compute_dtype)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, cache = forward(params, prompt_tokens, positions, config=config, cache=cache,
                            compute_dtype=compute_dtype)
    first_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    keys, values = jnp.stack(cache.keys), jnp.stack(cache.values)

    # 2. One decode step: embed, scan the layers over the stacked parameters, pick the argmax.
    def decode_step(carry, _):
        keys, values, token, slot = carry
        x = params["embed"]["embedding"][token][:, None].astype(compute_dtype)
        cos, sin = rope_angles(jnp.full((B, 1), slot, jnp.int32), inv_freq)
        # The query at `slot` sees every slot up to and including its own.
        attn_mask = jnp.broadcast_to(jnp.arange(S) <= slot, (B, 1, S))

        def layer_step(layer_carry, layer_params):
            x, keys, values, layer = layer_carry
            kv = (keys[layer], values[layer])
            x, (layer_keys, layer_values) = block.apply(
                {"params": layer_params}, x, cos, sin, attn_mask, kv, slot
            )
            new_key = jax.lax.dynamic_slice_in_dim(layer_keys, slot, 1, axis=1)
            new_value = jax.lax.dynamic_slice_in_dim(layer_values, slot, 1, axis=1)
            keys = jax.lax.dynamic_update_slice(keys, new_key[None], (layer, 0, slot, 0, 0))
            values = jax.lax.dynamic_update_slice(values, new_value[None], (layer, 0, slot, 0, 0))
            return (x, keys, values, layer + 1), None

        layer_carry = (x, keys, values, jnp.zeros((), jnp.int32))
        (x, keys, values, _), _ = jax.lax.scan(layer_step, layer_carry, params["layers"])
        next_token = jnp.argmax(_logits(params, x, config), axis=-1).astype(jnp.int32)
        return (keys, values, next_token, slot + 1), next_token

    carry = (keys, values, first_token, jnp.asarray(T, jnp.int32))
    _, tokens = jax.lax.scan(decode_step, carry, None, length=max_new_tokens - 1)
    return jnp.concatenate([first_token[:, None], tokens.T], axis=1)
