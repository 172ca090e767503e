"""Shared fixtures: one small float32 model shape that model and generation tests vary."""

import collections
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.model import param_shapes

# jax.monitoring event recorded at each XLA compilation, with the jitted function's name.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    """2 layers, D 64, 4 query heads of size 16, vocab 128; vary it with dataclasses.replace.

    init_std 0.1 (not the training default 0.02) gives logits of order 1, the largest about 4.
    A wrong mask or cache entry then moves them far beyond the test tolerances, greedy choices
    are not near ties, and float32 rounding stays near 1e-6. At 0.2 the largest logits reach 6
    and cached and uncached logits differ by up to 1.2e-5 from rounding alone.
    """
    return ModelConfig(
        vocab_size=128,
        num_layers=2,
        embed_dim=64,
        mlp_dim=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rope_scaling=None,
        norm_eps=1e-5,
        max_seq_len=64,
        tie_embeddings=True,
        init_std=0.1,
    )


@functools.cache
def _random_params(config: ModelConfig):
    rng = np.random.default_rng(0)
    flat = flax.traverse_util.flatten_dict(param_shapes(config), sep="/")
    params = {}
    for name, leaf in flat.items():
        if name.endswith("/scale"):
            # Norm scales near 1 but not equal to it, so a dropped scale shows in the output.
            values = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        else:
            values = config.init_std * rng.standard_normal(leaf.shape)
        params[name] = jnp.asarray(values, jnp.float32)
    return flax.traverse_util.unflatten_dict(params, sep="/")


@pytest.fixture(scope="session")
def make_params():
    """Return `make(config)`: float32 parameters in the layout of `param_shapes(config)`.

    Drawn with numpy (seed 0) instead of `init_params`, whose compile takes seconds per
    config on CPU. The result is cached per config.
    """
    return _random_params


@pytest.fixture
def compile_counts():
    """Count XLA compilations during the test by function name, such as "jit(_generate)"."""
    counts = collections.Counter()

    def listener(event, duration, **metadata):
        if event == BACKEND_COMPILE_EVENT:
            counts[metadata.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield counts
    jax.monitoring.unregister_event_duration_listener(listener)
