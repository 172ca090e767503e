"""Rotary position embeddings (RoPE) in the rotate-half layout, with Llama 3.1 frequency scaling.

Rotate-half pairs feature i with feature i + H/2 of each head, the layout of the Hugging Face
Llama implementation, so checkpoints in that layout load without permuting q and k. Meta's
original checkpoints interleave the pairs instead and need a per-head row permutation on import.

Llama 3.1 scaling (Meta's Llama 3.1 release, `apply_scaling` in its reference model) divides
the low frequencies by `factor`, keeps the high ones, and interpolates between two wavelength
bounds. Inverse frequencies and angles are always computed in float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxllm.config import RopeScaling


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Return the H/2 inverse frequencies `theta ** (-2i / H)` in float32, scaled if asked."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq

    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq

    # Long wavelengths (low frequencies) are slowed down by `factor`; short ones are kept.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)

    # The middle band blends the two, linearly in original_max_seq_len / wavelen.
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(in_band, blended, scaled).astype(np.float32)


def rope_angles(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Return float32 (cos, sin), each [B, T, H/2], for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, heads, H] by the angles (cos, sin [B, T, H/2]), in float32."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
