"""Mixed precision: compute dtypes by name and dynamic loss scaling for float16.

Parameters and optimizer state always stay float32. The model casts them to the compute dtype at
the point of use, so the gradients reaching the optimizer are float32 as well.

float16 has 5 exponent bits, so small activation gradients underflow to zero. Dynamic loss
scaling multiplies the loss by a large factor before differentiation and divides the gradients
by it afterwards. The rules follow `torch.amp.GradScaler` (PyTorch 2.x defaults: growth factor
2, backoff factor 0.5, growth interval 2000). When any gradient is inf or NaN the update is
skipped and the scale is halved. After `growth_interval` consecutive finite steps the scale is
doubled. One safeguard is added: the scale never grows to inf, because an inf scale would make
every later step non-finite and halving inf gives inf again.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm.config import COMPUTE_DTYPES, ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
assert set(_DTYPES) == set(COMPUTE_DTYPES)

# Consecutive finite steps before the scale doubles (the torch.amp.GradScaler default).
DEFAULT_GROWTH_INTERVAL = 2000
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5


def compute_dtype(name: str) -> jnp.dtype:
    """Return the jnp dtype for a `train.compute_dtype` name such as "bfloat16"."""
    try:
        return jnp.dtype(_DTYPES[name])
    except KeyError:
        raise ConfigError(
            f"unknown compute dtype {name!r}; use one of {', '.join(COMPUTE_DTYPES)}"
        ) from None


def uses_loss_scaling(name: str) -> bool:
    """True for the compute dtypes that need dynamic loss scaling (float16 only)."""
    return name == "float16"


@flax.struct.dataclass
class LossScale:
    """Dynamic loss-scale state: the current scale and the count of finite steps since the last
    change. A pytree, so it lives in the train state and is checkpointed with it."""

    # float32 scalar that multiplies the loss.
    scale: jax.Array
    # int32 scalar: consecutive steps with finite gradients since the scale last changed.
    good_steps: jax.Array
    growth_interval: int = flax.struct.field(pytree_node=False, default=DEFAULT_GROWTH_INTERVAL)

    @classmethod
    def create(cls, initial_scale: float, growth_interval: int = DEFAULT_GROWTH_INTERVAL) -> LossScale:
        if initial_scale < 1:
            raise ConfigError(f"train.loss_scale must be >= 1, got {initial_scale}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be positive, got {growth_interval}")
        return cls(
            scale=jnp.asarray(initial_scale, jnp.float32),
            good_steps=jnp.asarray(0, jnp.int32),
            growth_interval=growth_interval,
        )

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        return loss * self.scale

    def unscale(self, grads):
        """Divide every gradient by the scale. Gradients stay float32."""
        inverse = 1.0 / self.scale
        return jax.tree.map(lambda grad: grad * inverse.astype(grad.dtype), grads)

    def update(self, grads_finite: jax.Array) -> LossScale:
        """Return the state after a step whose gradients were (or were not) all finite."""
        good_steps = jnp.where(grads_finite, self.good_steps + 1, 0)
        grow = good_steps >= self.growth_interval
        grown = self.scale * GROWTH_FACTOR
        grown = jnp.where(jnp.isfinite(grown), grown, self.scale)
        scale = jnp.where(
            grads_finite,
            jnp.where(grow, grown, self.scale),
            self.scale * BACKOFF_FACTOR,
        )
        good_steps = jnp.where(grow, 0, good_steps)
        return self.replace(scale=scale, good_steps=good_steps.astype(jnp.int32))


def all_finite(tree) -> jax.Array:
    """Return a bool scalar that is True when no leaf of `tree` contains inf or NaN."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def select_tree(condition: jax.Array, on_true, on_false):
    """Pick `on_true` or `on_false` leaf by leaf from a traced bool scalar (no Python branch)."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)
