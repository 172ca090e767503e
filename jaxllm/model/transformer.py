"""The Llama 3 decoder and its pure forward pass `forward(params, tokens, positions, ...)`.

Layer parameters are stacked on a leading L axis. Without a cache the layers run under
`nn.scan`, which keeps compile time flat in depth. With a `KVCache` the layers are unrolled, so
each layer reads its weights and updates its own cache buffer in place.

Decoding loops should pass `unstack_layers(params)`: the same weights as L separate per-layer
trees. XLA:CPU (jaxlib 0.10.2) copies a layer's weights out of the stacked array whenever a
slice of it feeds a matmul, and inside a `lax.scan` over decode steps it repeats that copy at
every step, which halved seed-190m decode speed (`python -m jaxllm.bench decode`, 2-core EPYC).
Slicing once before the loop removes the copy from the loop body. A scan over layers slices at a
traced index, so it cannot avoid the copy and stays unrolled here.

Llama 3 reference: arXiv:2407.21783. Departure: none in the math; RMSNorm multiplies the float32
normalised activations by the weight before casting back (Hugging Face casts first), which
only matters for bfloat16 and float16 compute.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import KVCache
from jaxllm.model.layers import Block, RMSNorm
from jaxllm.model.rope import rope_angles, rope_inverse_frequencies


class Transformer(nn.Module):
    """Embeddings, L decoder blocks, final RMSNorm and a tied or untied LM head."""

    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, positions, mask=None, cache: KVCache | None = None):
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)

        # 1. Embed tokens [B, T] -> [B, T, D] and compute rotary angles per position.
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=init, name="embed")
        x = embed(tokens).astype(self.dtype)
        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = rope_angles(positions, inv_freq)

        # 2. The layer stack: scanned without a cache, unrolled over the stacked params with one.
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.dtype, return_kv=False, name="layers")
        if cache is None:
            if not self.is_initializing() and _is_unstacked(self.variables["params"]["layers"]):
                raise ValueError(
                    "per-layer parameters from unstack_layers only work with a KVCache; pass "
                    "the stacked parameters for a forward pass without a cache"
                )
            T = tokens.shape[1]
            causal = jnp.tril(jnp.ones((T, T), bool))
            attn_mask = causal[None, :, :] & mask[:, None, :]
            x, _ = layers(x, cos, sin, attn_mask)
        else:
            x, cache = self._unrolled_layers(x, cos, sin, mask, cache)

        # 3. Final norm and LM head in float32: logits [B, T, V].
        x = RMSNorm(cfg.norm_eps, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = x @ embed.embedding.T
        else:
            head = self.param("lm_head", init, (cfg.embed_dim, cfg.vocab_size), jnp.float32)
            logits = x @ head
        return logits, cache

    def _unrolled_layers(self, x, cos, sin, mask, cache: KVCache):
        T = x.shape[1]
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, cache.end))

        # A query at slot end + t sees every earlier real slot. Causality is by slot, not by
        # position, because left padding shifts positions per row but not slot order.
        query_slots = cache.end + jnp.arange(T)
        key_slots = jnp.arange(cache.max_len)
        attn_mask = (key_slots[None, None, :] <= query_slots[None, :, None]) & key_mask[:, None, :]

        layers = self.variables["params"]["layers"]
        block = Block(self.config, self.dtype, parent=None)
        keys, values = [], []
        for i in range(self.config.num_layers):
            if _is_unstacked(layers):
                layer_params = layers[str(i)]
            else:
                layer_params = jax.tree.map(lambda leaf, i=i: leaf[i], layers)
            kv = (cache.keys[i], cache.values[i])
            x, (k, v) = block.apply({"params": layer_params}, x, cos, sin, attn_mask, kv, cache.end)
            keys.append(k)
            values.append(v)
        cache = KVCache(keys=tuple(keys), values=tuple(values), key_mask=key_mask, end=cache.end + T)
        return x, cache


def _is_unstacked(layers) -> bool:
    """True for the per-layer form of `unstack_layers` (keys "0" .. "L-1")."""
    return "0" in layers


def unstack_layers(params):
    """Split the stacked layer parameters into L per-layer trees under keys "0" .. "L-1".

    Every other entry is passed through unchanged. `forward` accepts the result only together
    with a `KVCache`. Call it once outside a decode loop; inside a jitted function the split
    costs one copy of the layer weights per call.
    """
    layers = params["layers"]
    if _is_unstacked(layers):
        return params
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    per_layer = {
        str(i): jax.tree.map(lambda leaf, i=i: leaf[i], layers) for i in range(num_layers)
    }
    return {**params, "layers": per_layer}


def positions_from_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """Positions [B, T] for a left-padded mask: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def forward(
    params,
    tokens: jnp.ndarray,
    positions: jnp.ndarray,
    *,
    config: ModelConfig,
    mask: jnp.ndarray | None = None,
    cache: KVCache | None = None,
    compute_dtype: Any = jnp.float32,
) -> tuple[jnp.ndarray, KVCache | None]:
    """Run the decoder; returns float32 logits [B, T, V] and the updated cache (or None).

    tokens, positions: [B, T] int32. mask: [B, T] bool, True for real tokens (default all).
    With a cache the tokens are written at slots [cache.end, cache.end + T), and `params` may
    be the per-layer form that `unstack_layers` returns.
    """
    model = Transformer(config, compute_dtype)
    return model.apply({"params": params}, tokens, positions, mask, cache)


@functools.partial(jax.jit, static_argnames="config")
def init_params(config: ModelConfig, rng: jax.Array):
    """Initialise float32 parameters: normal(init_std) kernels and embedding, unit norm scales.

    Compiled as one program: run eagerly, Flax initialisation dispatches dozens of small ones.
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config).init(rng, tokens, tokens)["params"]


def param_shapes(config: ModelConfig):
    """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s, without allocating memory."""
    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def count_params(params) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))
