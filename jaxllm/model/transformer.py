"""The Llama 3 decoder and its pure forward pass `forward(params, tokens, positions, ...)`.

Layer parameters are stacked on a leading L axis and the layers run under `nn.scan`, which
keeps compile time flat in depth. With a `KVCache`, `forward` runs the cached pass of
`jaxllm.model.decode` instead, over the same weights laid out for decoding.

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
from jaxllm.model.decode import DecodeParams, decode_forward, prepare_decode_params
from jaxllm.model.layers import Block, RMSNorm
from jaxllm.model.rope import rope_angles, rope_inverse_frequencies


class Transformer(nn.Module):
    """Embeddings, L decoder blocks, final RMSNorm and a tied or untied LM head."""

    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, positions, mask=None):
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)

        # 1. Embed tokens [B, T] -> [B, T, D] and compute rotary angles per position.
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=init, name="embed")
        x = embed(tokens).astype(self.dtype)
        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = rope_angles(positions, inv_freq)

        # 2. The layer stack, scanned over the stacked parameters.
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.dtype, name="layers")
        T = tokens.shape[1]
        causal = jnp.tril(jnp.ones((T, T), bool))
        x, _ = layers(x, cos, sin, causal[None, :, :] & mask[:, None, :])

        # 3. Final norm and LM head in float32: logits [B, T, V].
        x = RMSNorm(cfg.norm_eps, name="final_norm")(x)
        if cfg.tie_embeddings:
            return x @ embed.embedding.T
        head = self.param("lm_head", init, (cfg.embed_dim, cfg.vocab_size), jnp.float32)
        return x @ head


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
    be the `DecodeParams` that `prepare_decode_params` returns; without one they must be the
    trained parameters.
    """
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    if cache is not None:
        decode_params = prepare_decode_params(params, config, compute_dtype)
        return decode_forward(
            decode_params, tokens, positions, mask, cache,
            config=config, compute_dtype=compute_dtype,
        )
    if isinstance(params, DecodeParams):
        raise ValueError(
            "DecodeParams from prepare_decode_params only work with a KVCache; pass the "
            "trained parameters for a forward pass without a cache"
        )
    logits = Transformer(config, compute_dtype).apply({"params": params}, tokens, positions, mask)
    return logits, None


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
