"""Training losses as pure functions returning `(loss, metrics)`.

Log-softmax and the reductions run in float32 whatever the compute dtype of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean of `values` over positions where `mask` is True; 0 when nothing is masked in."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_log_probs(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Log-probability [B, T] of each target token under logits [B, T, V], in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def cross_entropy(
    logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Next-token cross-entropy in nats, averaged over the tokens where `mask` is True.

    logits: [B, T, V]; targets: [B, T] int; mask: [B, T] bool (False for prompt or padding).
    Normalisation: one mean over all counted tokens of the batch, so every token weighs the
    same whatever its row's length.
    """
    nll = -token_log_probs(logits, targets)
    loss = masked_mean(nll, mask)
    metrics = {"loss/ce": loss, "loss/tokens": jnp.sum(mask.astype(jnp.int32))}
    return loss, metrics
