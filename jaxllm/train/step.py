"""The compiled pretraining step and evaluation step.

A batch is int32 windows [B, T + 1] from `jaxllm.data`: the model reads `batch[:, :-1]` and
predicts `batch[:, 1:]`, every position counts, and positions are 0..T-1 in every row.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import Config
from jaxllm.losses import cross_entropy
from jaxllm.model import forward
from jaxllm.precision import all_finite, compute_dtype, select_tree
from jaxllm.train.optim import make_optimizer, make_schedule
from jaxllm.train.state import TrainState

Metrics = dict[str, jax.Array]


def _split_windows(batch: jax.Array):
    """Inputs [B, T], targets [B, T], positions [B, T] and an all-True mask [B, T]."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = jnp.ones((B, T), bool)
    return inputs, targets, positions, mask


def _make_loss_fn(config: Config):
    dtype = compute_dtype(config.train.compute_dtype)

    def loss_fn(params, batch, rng):
        # `rng` is unused until a stochastic layer (dropout) exists; it keeps the key plumbing.
        del rng
        inputs, targets, positions, mask = _split_windows(batch)
        logits, _ = forward(params, inputs, positions, config=config.model, mask=mask,
                            compute_dtype=dtype)
        return cross_entropy(logits, targets, mask)

    return loss_fn


def make_train_step(config: Config) -> Callable[[TrainState, jax.Array], tuple[TrainState, Metrics]]:
    """Return the jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

    Metrics: `train/loss` (mean cross-entropy in nats), `train/grad_norm` (global norm before
    clipping), `train/lr` (learning rate of this update), and with float16 compute
    `train/loss_scale` (the scale used) and `train/skipped` (1 when non-finite gradients
    skipped the update, else 0).
    """
    loss_fn = _make_loss_fn(config)
    schedule = make_schedule(config)
    optimizer_config = config.optimizer

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, Metrics]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        learning_rate = schedule(state.step)
        optimizer = make_optimizer(optimizer_config, learning_rate)

        # 1. Loss and float32 gradients; with float16 the loss is scaled before differentiation.
        scaler = state.loss_scale
        if scaler is None:
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
        else:
            def scaled_loss_fn(params):
                loss, aux = loss_fn(params, batch, step_rng)
                return scaler.scale_loss(loss), (loss, aux)

            (_, (loss, _)), grads = jax.value_and_grad(scaled_loss_fn, has_aux=True)(state.params)
            grads = scaler.unscale(grads)
        grad_norm = optax.tree.norm(grads)

        # 2. Clip and apply AdamW.
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": learning_rate}

        # 3. float16: keep params and optimizer state when a gradient overflowed; adapt the scale.
        loss_scale = None
        if scaler is not None:
            finite = all_finite(grads)
            params = select_tree(finite, params, state.params)
            opt_state = select_tree(finite, opt_state, state.opt_state)
            loss_scale = scaler.update(finite)
            metrics["train/loss_scale"] = scaler.scale
            metrics["train/skipped"] = (~finite).astype(jnp.int32)

        new_state = state.replace(
            params=params, opt_state=opt_state, step=state.step + 1, loss_scale=loss_scale
        )
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(config: Config) -> Callable[[object, jax.Array], Metrics]:
    """Return the jitted `eval_step(params, batch) -> metrics` with `loss/ce` (mean nats per
    token) and `loss/tokens` (the number of tokens it averages over)."""
    loss_fn = _make_loss_fn(config)

    def eval_step(params, batch: jax.Array) -> Metrics:
        _, metrics = loss_fn(params, batch, None)
        return metrics

    return jax.jit(eval_step)
