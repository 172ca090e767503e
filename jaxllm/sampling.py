"""Next-token sampling: temperature, top-k and top-p (nucleus) filtering, greedy at temperature 0.

All knobs are arrays (a scalar or one value per row), never Python branches, so changing them
does not recompile a jitted caller. Filters apply in the order temperature, top-k, top-p, each
to the distribution the previous one left. Ties at a cut-off are all kept, so top-k can keep
more than k tokens when logits tie exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logit given to filtered-out tokens; finite so an all-filtered row cannot turn into NaN.
FILTERED_LOGIT = float(jnp.finfo(jnp.float32).min)
# Temperatures below this are treated as greedy decoding.
MIN_TEMPERATURE = 1e-6


def _per_row(value, batch_size: int, dtype) -> jnp.ndarray:
    """Broadcast a scalar or [B] knob to [B, 1]."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch_size,))[:, None]


def filter_top_k(logits: jnp.ndarray, top_k) -> jnp.ndarray:
    """Keep the top_k largest logits per row of [B, V]; top_k <= 0 keeps everything."""
    B, V = logits.shape
    k = _per_row(top_k, B, jnp.int32)
    descending = -jnp.sort(-logits, axis=-1)
    kth_largest = jnp.take_along_axis(descending, jnp.clip(k - 1, 0, V - 1), axis=-1)
    keep = (logits >= kth_largest) | (k <= 0)
    return jnp.where(keep, logits, FILTERED_LOGIT)


def filter_top_p(logits: jnp.ndarray, top_p) -> jnp.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches top_p.

    A token is kept when the probability of all more likely tokens is below top_p, so the token
    that crosses the threshold stays in. top_p >= 1 keeps everything.
    """
    B, _ = logits.shape
    p = _per_row(top_p, B, jnp.float32)
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token is always kept, so top_p <= 0 behaves like greedy filtering.
    kept_count = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(descending, kept_count - 1, axis=-1)
    keep = (logits >= threshold) | (p >= 1.0)
    return jnp.where(keep, logits, FILTERED_LOGIT)


def sample_token(logits: jnp.ndarray, rng: jax.Array, *, temperature, top_k, top_p) -> jnp.ndarray:
    """Draw one token per row from float32 logits [B, V]; returns int32 [B].

    temperature == 0 picks the argmax (greedy) for that row, ignoring top-k and top-p.
    """
    B, _ = logits.shape
    logits = logits.astype(jnp.float32)
    temperature = _per_row(temperature, B, jnp.float32)

    scaled = logits / jnp.maximum(temperature, MIN_TEMPERATURE)
    filtered = filter_top_p(filter_top_k(scaled, top_k), top_p)
    sampled = jax.random.categorical(rng, filtered, axis=-1)

    greedy = jnp.argmax(logits, axis=-1)
    return jnp.where(temperature[:, 0] < MIN_TEMPERATURE, greedy, sampled).astype(jnp.int32)
