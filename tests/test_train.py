"""Optimizer schedule, weight-decay mask, float16 loss scaling, the compiled train step and
the metrics log."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError, load_config
from jaxllm.data import BatchSampler, prepare_data
from jaxllm.model import param_shapes
from jaxllm.precision import LossScale, all_finite, compute_dtype
from jaxllm.train import (
    MetricsLog,
    create_train_state,
    make_eval_step,
    make_schedule,
    make_train_step,
    weight_decay_mask,
)

# A 2-layer model on a slice of the built-in corpus: fast to compile and run on 2 CPU cores.
TINY = [
    "model.num_layers=2",
    "model.embed_dim=64",
    "model.mlp_dim=128",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_chars_per_doc=20000",
    "train.steps=16",
    "train.batch_size=4",
    "optimizer.learning_rate=3.0e-3",
    "optimizer.warmup_steps=4",
    "optimizer.min_lr_ratio=0.1",
]


def tiny_config(*extra: str):
    return load_config("tiny", TINY + list(extra))


def host_copy(tree):
    """Copy arrays to numpy before a donating step can reuse their buffers."""
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), tree)


def assert_trees_equal(actual, desired):
    actual_leaves, actual_def = jax.tree.flatten(actual)
    desired_leaves, desired_def = jax.tree.flatten(desired)
    assert actual_def == desired_def
    for a, d in zip(actual_leaves, desired_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(d))


@pytest.fixture(scope="module")
def corpus_windows():
    config = tiny_config()
    return prepare_data(config.data, config.model.vocab_size).train_windows


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.data.seq_len + 1)
    return jnp.asarray(rng.integers(0, config.model.vocab_size, shape), jnp.int32)


# Compiled once per module: compilation dominates the run time of these tests.


@pytest.fixture(scope="module")
def float32_run():
    """(config, new_state(), train_step) for float32 compute."""
    config = tiny_config()
    new_state = jax.jit(lambda: create_train_state(config, jax.random.key(0)))
    return config, new_state, make_train_step(config)


@pytest.fixture(scope="module")
def float16_run():
    """(config, new_state(initial_scale), train_step) for float16 compute, growth interval 2."""
    config = tiny_config("train.compute_dtype=float16")
    init = jax.jit(lambda: create_train_state(config, jax.random.key(0), growth_interval=2))

    def new_state(initial_scale):
        state = init()
        return state.replace(loss_scale=state.loss_scale.replace(
            scale=jnp.asarray(initial_scale, jnp.float32)))

    return config, new_state, make_train_step(config)


# --- schedule and optimizer ---------------------------------------------------------------


def test_schedule_values_at_warmup_and_end():
    schedule = make_schedule(tiny_config())
    # Warmup: step s < 4 gets 3e-3 * (s + 1) / 4, so step 0 already has 7.5e-4.
    np.testing.assert_allclose(float(schedule(0)), 7.5e-4, rtol=1e-6)
    # Step 3 = W - 1 reaches the peak, and the cosine starts from the peak at step W = 4.
    np.testing.assert_allclose(float(schedule(3)), 3e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(4)), 3e-3, rtol=1e-6)
    # Halfway through the cosine (step 4 + 12/2 = 10): floor + (peak - floor) / 2 = 1.65e-3.
    np.testing.assert_allclose(float(schedule(10)), 1.65e-3, rtol=1e-5)
    # train.steps and beyond: min_lr_ratio * peak = 3e-4.
    np.testing.assert_allclose(float(schedule(16)), 3e-4, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 3e-4, rtol=1e-5)


def test_schedule_rejects_warmup_longer_than_run():
    with pytest.raises(ConfigError, match="optimizer.warmup_steps"):
        make_schedule(tiny_config("optimizer.warmup_steps=16"))


def test_weight_decay_skips_norms_and_embedding():
    config = tiny_config("model.tie_embeddings=false")
    mask = weight_decay_mask(param_shapes(config.model))
    assert mask["embed"]["embedding"] is False
    assert mask["final_norm"]["scale"] is False
    assert mask["layers"]["attn_norm"]["scale"] is False
    assert mask["layers"]["mlp_norm"]["scale"] is False
    assert mask["layers"]["attn"]["q_proj"] is True
    assert mask["layers"]["mlp"]["down_proj"] is True
    assert mask["lm_head"] is True


# --- the train step -----------------------------------------------------------------------


def test_train_step_metrics_and_counters(float32_run):
    config, new_state, train_step = float32_run
    state = new_state()
    rng_before = np.array(jax.random.key_data(state.rng))

    state, metrics = train_step(state, random_batch(config))

    assert set(metrics) == {"train/loss", "train/grad_norm", "train/lr"}
    assert int(state.step) == 1
    assert state.loss_scale is None
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(state.rng)), rng_before)
    np.testing.assert_allclose(float(metrics["train/lr"]), 7.5e-4, rtol=1e-6)
    # Untrained logits are nearly uniform, so the loss starts near ln(512) = 6.24.
    np.testing.assert_allclose(float(metrics["train/loss"]), np.log(512), atol=0.1)
    assert float(metrics["train/grad_norm"]) > 0


def test_loss_falls_on_corpus(corpus_windows, float32_run):
    config, new_state, train_step = float32_run
    state = new_state()
    sampler = BatchSampler(corpus_windows, config.train.batch_size, seed=0)

    losses = []
    for step in range(config.train.steps):
        state, metrics = train_step(state, jnp.asarray(sampler.batch(step)))
        losses.append(float(metrics["train/loss"]))

    # Measured: about 6.3 at step 1 and 5.5 after 16 steps; 0.4 nats leaves room for noise.
    assert np.mean(losses[-3:]) < losses[0] - 0.4, losses


def test_eval_step_counts_every_target(float32_run):
    config, new_state, _ = float32_run
    state = new_state()
    metrics = make_eval_step(config)(state.params, random_batch(config))
    assert int(metrics["loss/tokens"]) == config.train.batch_size * config.data.seq_len
    np.testing.assert_allclose(float(metrics["loss/ce"]), np.log(512), atol=0.1)


# --- float16 loss scaling -----------------------------------------------------------------


def test_compute_dtype_names():
    assert compute_dtype("float32") == jnp.float32
    assert compute_dtype("bfloat16") == jnp.bfloat16
    assert compute_dtype("float16") == jnp.float16
    with pytest.raises(ConfigError, match="float64"):
        compute_dtype("float64")


def test_loss_scale_update_rules():
    scaler = LossScale.create(1024.0, growth_interval=3)

    overflowed = scaler.update(jnp.asarray(False))
    assert float(overflowed.scale) == 512.0
    assert int(overflowed.good_steps) == 0

    grown = scaler
    for _ in range(2):
        grown = grown.update(jnp.asarray(True))
    assert float(grown.scale) == 1024.0
    assert int(grown.good_steps) == 2
    grown = grown.update(jnp.asarray(True))
    assert float(grown.scale) == 2048.0
    assert int(grown.good_steps) == 0


def test_loss_scale_never_grows_to_inf():
    largest = float(jnp.finfo(jnp.float32).max)
    scaler = LossScale.create(largest, growth_interval=1)
    assert float(scaler.update(jnp.asarray(True)).scale) == largest


def test_all_finite_detects_inf_and_nan():
    assert bool(all_finite({"a": jnp.ones(3), "b": jnp.zeros((2, 2))}))
    assert not bool(all_finite({"a": jnp.array([1.0, jnp.inf])}))
    assert not bool(all_finite({"a": jnp.ones(2), "b": jnp.array([jnp.nan])}))


def test_float16_overflow_skips_update_and_halves_scale(float16_run):
    config, new_state, train_step = float16_run
    # A scale of 2^40 makes the float16 activation gradients overflow (float16 max is 65504).
    state = new_state(2.0**40)
    params_before = host_copy(state.params)
    opt_state_before = host_copy(state.opt_state)

    state, metrics = train_step(state, random_batch(config))

    assert int(metrics["train/skipped"]) == 1
    assert float(metrics["train/loss_scale"]) == 2.0**40
    assert float(state.loss_scale.scale) == 2.0**39
    assert int(state.loss_scale.good_steps) == 0
    assert int(state.step) == 1
    assert_trees_equal(host_copy(state.params), params_before)
    assert_trees_equal(host_copy(state.opt_state), opt_state_before)
    # The loss itself is reported unscaled.
    np.testing.assert_allclose(float(metrics["train/loss"]), np.log(512), atol=0.1)


def test_float16_scale_doubles_after_growth_interval(float16_run):
    config, new_state, train_step = float16_run
    state = new_state(256.0)
    params_before = host_copy(state.params)

    state, metrics = train_step(state, random_batch(config, seed=0))
    assert int(metrics["train/skipped"]) == 0
    assert float(state.loss_scale.scale) == 256.0
    assert int(state.loss_scale.good_steps) == 1

    state, metrics = train_step(state, random_batch(config, seed=1))
    assert int(metrics["train/skipped"]) == 0
    assert float(metrics["train/loss_scale"]) == 256.0
    assert float(state.loss_scale.scale) == 512.0
    assert int(state.loss_scale.good_steps) == 0

    changed = jax.tree.map(lambda new, old: not np.array_equal(np.asarray(new), old),
                           state.params, params_before)
    assert all(jax.tree.leaves(changed))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))


# --- metrics.jsonl ------------------------------------------------------------------------


def test_metrics_log_truncates_after_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "train/loss": 6.0}, {"step": 4, "train/loss": 5.0},
            {"step": 4, "val/loss": 5.5}, {"step": 8, "train/loss": 4.0}]
    # The last line was cut off by a process killed while writing it.
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 9, "tra',
                    encoding="utf-8")
    log = MetricsLog(path)

    log.truncate_after(4)
    assert log.rows() == rows[:3]

    log.append({"step": 5, "train/loss": float("inf")})
    log.close()
    assert log.rows()[-1] == {"step": 5, "train/loss": None}
    assert path.read_text(encoding="utf-8").endswith('{"step": 5, "train/loss": null}\n')


def test_metrics_log_untouched_without_later_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 6.0}\n', encoding="utf-8")
    modified = path.stat().st_mtime_ns
    MetricsLog(path).truncate_after(4)
    assert path.stat().st_mtime_ns == modified
