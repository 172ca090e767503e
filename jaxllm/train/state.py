"""The train state pytree: everything that changes during pretraining and must be checkpointed."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxllm.config import Config
from jaxllm.model import init_params
from jaxllm.precision import DEFAULT_GROWTH_INTERVAL, LossScale, uses_loss_scaling
from jaxllm.train.optim import make_optimizer, make_schedule


@flax.struct.dataclass
class TrainState:
    """Parameters, optimizer state, step counter, base key and loss-scale state of one run."""

    # float32 parameter pytree, as `jaxllm.model.init_params` returns it.
    params: Any
    # optax state of `make_optimizer` over `params`.
    opt_state: Any
    # int32 scalar: updates attempted so far, which is also the index of the next batch.
    step: jax.Array
    # Typed PRNG key. Step s draws its randomness from `fold_in(rng, s)`.
    rng: jax.Array
    # Dynamic loss-scale state for float16 compute; None for float32 and bfloat16.
    loss_scale: LossScale | None = None


def create_train_state(
    config: Config, rng: jax.Array, *, growth_interval: int = DEFAULT_GROWTH_INTERVAL
) -> TrainState:
    """Initialise parameters and optimizer state at step 0 from a typed key `rng`.

    `growth_interval` sets the float16 loss-scale growth interval (see `jaxllm.precision`).
    """
    # Checks optimizer.warmup_steps against train.steps before any work is done.
    make_schedule(config)
    return _initial_state(config, growth_interval, rng)


# Compiled as one program, because run eagerly the initialisation compiles each of its dozens of
# operations separately, which takes longer on CPU.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _initial_state(config: Config, growth_interval: int, rng: jax.Array) -> TrainState:
    init_rng, train_rng = jax.random.split(rng)
    params = init_params(config.model, init_rng)
    # Any learning rate gives the same state structure; the step supplies the real one.
    opt_state = make_optimizer(config.optimizer, learning_rate=0.0).init(params)
    loss_scale = None
    if uses_loss_scaling(config.train.compute_dtype):
        loss_scale = LossScale.create(config.train.loss_scale, growth_interval)
    return TrainState(
        params=params,
        opt_state=opt_state,
        step=jnp.asarray(0, jnp.int32),
        rng=train_rng,
        loss_scale=loss_scale,
    )


def abstract_train_state(config: Config, *, growth_interval: int = DEFAULT_GROWTH_INTERVAL) -> TrainState:
    """Return the train state as `jax.ShapeDtypeStruct` leaves, without allocating memory."""
    return jax.eval_shape(
        lambda rng: create_train_state(config, rng, growth_interval=growth_interval),
        jax.random.key(0),
    )
