"""Building blocks of the decoder: RMSNorm, grouped-query attention, SwiGLU MLP, and one block.

Parameters are float32; each module casts them to its compute `dtype` at the point of use.
Kernels are stored as [in, out] with the head axes split out ([D, N, H] for the query
projection), so einsum strings read with the dimension letters B T S D F N K G H.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.model.rope import apply_rope

# Score given to masked attention entries. A finite minimum (not -inf) keeps rows with no valid
# key, such as left padding, finite after the softmax instead of NaN.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float, dtype: Any = None) -> jnp.ndarray:
    """Return `scale * x / rms(x)` computed in float32, cast to `dtype` (None keeps float32)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    out = scale * normed
    return out if dtype is None else out.astype(dtype)


def attend(q, keys, values, attn_mask, dtype: Any) -> jnp.ndarray:
    """Grouped-query attention of q [B, T, N, H] over keys and values [B, S, K, H].

    attn_mask: [B, T, S] bool, True where a query may attend to a key slot. Query head
    n = k * G + g reads kv head k. Scores and softmax are float32. Returns [B, T, N, H].
    """
    B, T, N, H = q.shape
    K = keys.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, keys, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5)
    scores = jnp.where(attn_mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    mixed = jnp.einsum("bkgts,bskh->btkgh", probs, values)
    return mixed.reshape(B, T, N, H)


class RMSNorm(nn.Module):
    """`scale * x / rms(x)` computed in float32 (arXiv:1910.07467, eq. 4, without the bias)."""

    eps: float
    # Output dtype; None keeps float32 (used for the final norm that feeds the logits).
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return rms_norm(x, scale, self.eps, self.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention (arXiv:2305.13245) with RoPE, over the keys of one call.

    Cached decoding runs `jaxllm.model.decode.decode_block`, the same math over fused weights.
    """

    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, attn_mask):
        """Attend from x [B, T, D] over the same T tokens.

        attn_mask: [B, T, T] bool, True where a query may attend to a key.
        Returns (out [B, T, D], (k, v)) with the rotated keys and the values, each [B, T, K, H].
        """
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_proj = self.param("q_proj", init, (D, N, H), jnp.float32).astype(self.dtype)
        k_proj = self.param("k_proj", init, (D, K, H), jnp.float32).astype(self.dtype)
        v_proj = self.param("v_proj", init, (D, K, H), jnp.float32).astype(self.dtype)
        o_proj = self.param("o_proj", init, (N, H, D), jnp.float32).astype(self.dtype)

        # 1. Project and rotate: q [B, T, N, H], k and v [B, T, K, H].
        q = apply_rope(jnp.einsum("btd,dnh->btnh", x, q_proj), cos, sin)
        k = apply_rope(jnp.einsum("btd,dkh->btkh", x, k_proj), cos, sin)
        v = jnp.einsum("btd,dkh->btkh", x, v_proj)

        # 2. Attend and project back: [B, T, N, H] -> [B, T, D].
        mixed = attend(q, k, v, attn_mask, self.dtype)
        out = jnp.einsum("btnh,nhd->btd", mixed, o_proj)
        return out, (k, v)


class MLP(nn.Module):
    """SwiGLU feed-forward `down(silu(gate(x)) * up(x))` (arXiv:2002.05202, eq. 6)."""

    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        D, F = cfg.embed_dim, cfg.mlp_dim
        gate_proj = self.param("gate_proj", init, (D, F), jnp.float32).astype(self.dtype)
        up_proj = self.param("up_proj", init, (D, F), jnp.float32).astype(self.dtype)
        down_proj = self.param("down_proj", init, (F, D), jnp.float32).astype(self.dtype)
        hidden = nn.silu(x @ gate_proj) * (x @ up_proj)
        return hidden @ down_proj


class Block(nn.Module):
    """One pre-norm decoder layer: attention then MLP, each added to the residual stream.

    Returns (x, None), the (carry, output) form of a scan over layers.
    """

    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, attn_mask):
        eps = self.config.norm_eps
        attn_out, _ = Attention(self.config, self.dtype, name="attn")(
            RMSNorm(eps, self.dtype, name="attn_norm")(x), cos, sin, attn_mask
        )
        x = x + attn_out
        x = x + MLP(self.config, self.dtype, name="mlp")(RMSNorm(eps, self.dtype, name="mlp_norm")(x))
        return x, None
