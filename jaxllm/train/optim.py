"""The optimizer: gradient clipping, then AdamW, with a warmup-cosine learning-rate schedule.

The learning rate is a function of the train state's step and is passed into `make_optimizer`
on every step instead of living inside the optax state. A float16 step whose gradients are not
finite keeps the optimizer state unchanged, and with an optax-internal schedule that step would
also hold the schedule back. Here the schedule follows the number of batches consumed.

Weight decay (decoupled, as in AdamW, arXiv:1711.05101 Algorithm 2 line 12) applies to the
projection kernels and an untied LM head only. Two kinds of parameters are excluded:
- RMSNorm scales, because decay pulls them toward 0 while their neutral value is 1;
- the token embedding, because a rare token's row receives a gradient only in the batches
  that contain it, while decay would shrink it on every step. With tied embeddings this row
  matrix is also the LM head.
The mask is decided by parameter name (`scale`, `embedding`), not by rank: the stacked layer
parameters carry a leading L axis, so a norm scale is 2-D there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import Config, ConfigError, OptimizerConfig

# Leaf names that weight decay skips (see the module docstring).
NO_DECAY_NAMES = frozenset({"scale", "embedding"})


def _leaf_name(path) -> str:
    last = path[-1]
    for attribute in ("key", "name", "idx"):
        if hasattr(last, attribute):
            return str(getattr(last, attribute))
    return str(last)


def weight_decay_mask(params):
    """Return a bool pytree like `params` that is True where AdamW applies weight decay."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) not in NO_DECAY_NAMES, params
    )


def make_schedule(config: Config):
    """Return `schedule(step) -> learning rate` for the update made at `step` (0-based).

    Linear warmup: step s < W gets `lr * (s + 1) / W`, so the first update already moves and
    step W - 1 reaches the peak. Then a half cosine from `lr` at step W to
    `min_lr_ratio * lr` at step `train.steps`, where it stays.
    """
    opt = config.optimizer
    total = config.train.steps
    warmup = opt.warmup_steps
    if warmup >= total:
        raise ConfigError(
            f"optimizer.warmup_steps ({warmup}) must be less than train.steps ({total}); "
            "lower the warmup or train longer"
        )
    peak = opt.learning_rate
    floor = opt.min_lr_ratio * peak

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1.0) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
        decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def make_optimizer(optimizer_config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """Chain global-norm clipping and AdamW at a fixed `learning_rate` (a float or traced scalar).

    The optimizer state has the same structure for every learning rate, so the state built
    with one value can be updated by an optimizer built with another.
    """
    opt = optimizer_config
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(
            learning_rate=learning_rate,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=weight_decay_mask,
        ),
    )
