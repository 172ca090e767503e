"""Tests of the decoder: shapes, parameter layouts, RoPE, RMSNorm, masking and cached decoding.

Everything runs in float32, unless a test names bfloat16, with fixed seeds. One jitted
`forward` serves all tests, so a shape compiled for one test is reused by the next.
"""

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import RopeScaling
from jaxllm.kv_cache import KVCache
from jaxllm.model import (
    RMSNorm,
    apply_rope,
    count_params,
    forward,
    param_shapes,
    positions_from_mask,
    prepare_decode_params,
    rope_angles,
    rope_inverse_frequencies,
)

# Sequence length of the full-forward tests. The prompt of the cached decode test has
# PROMPT_LEN tokens, and the chunk sizes add up to SEQ_LEN. The chunks reuse the compiled
# shapes T = 4 and T = 1 of the cached decode test, so only T = 8 compiles anew.
SEQ_LEN = 14
BATCH = 2
PROMPT_LEN = 4
CHUNK_SIZES = (4, 1, 8, 1)
# The cached path runs one chunk of queries at a time against the whole buffer, and the full
# forward runs all queries at once. XLA groups their float32 sums differently, so the logits
# agree to rounding (measured up to about 2e-6 for this model), not bit for bit.
CACHE_ATOL = 1e-5

# 4 is num_heads of the tiny config: plain multi-head attention.
KV_HEADS = [1, 2, 4]
TIED = [True, False]
# The Llama 3.1 (and 3.2) release values.
LLAMA31_SCALING = RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
)

jit_forward = jax.jit(forward, static_argnames=("config", "compute_dtype"))


def random_tokens(config, shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, shape), jnp.int32)


def full_logits(params, config, tokens, mask=None, compute_dtype=jnp.float32):
    """Run the uncached forward over left-padded tokens [B, T].

    The mask is always passed (all True by default) so that each shape compiles only once.
    """
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    positions = positions_from_mask(mask)
    logits, cache = jit_forward(
        params, tokens, positions, config=config, mask=mask, compute_dtype=compute_dtype
    )
    assert cache is None
    return logits


# --- shapes and parameters -----------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_logits_shape_and_dtype(tiny_model_config, make_params, compute_dtype):
    params = make_params(tiny_model_config)
    tokens = random_tokens(tiny_model_config, (BATCH, SEQ_LEN), seed=1)

    logits = full_logits(params, tiny_model_config, tokens, compute_dtype=compute_dtype)

    assert logits.shape == (BATCH, SEQ_LEN, tiny_model_config.vocab_size)
    assert logits.dtype == jnp.float32


def test_bfloat16_logits_close_to_float32(tiny_model_config, make_params):
    params = make_params(tiny_model_config)
    tokens = random_tokens(tiny_model_config, (BATCH, SEQ_LEN), seed=1)

    logits32 = full_logits(params, tiny_model_config, tokens)
    logits16 = full_logits(params, tiny_model_config, tokens, compute_dtype=jnp.bfloat16)

    # bfloat16 rounds every matmul input to 8 significant bits (relative error up to 2**-9,
    # about 0.002). Roughly ten such roundings in sequence over two layers give an estimated
    # 1% error on logits of magnitude up to about 4, so about 0.04 (measured maximum 0.036).
    np.testing.assert_allclose(logits16, logits32, rtol=0, atol=0.1)


@pytest.mark.parametrize("tie_embeddings", TIED)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_param_tree_layout(tiny_model_config, num_kv_heads, tie_embeddings):
    config = dataclasses.replace(
        tiny_model_config, num_kv_heads=num_kv_heads, tie_embeddings=tie_embeddings
    )
    L, D, F, V = config.num_layers, config.embed_dim, config.mlp_dim, config.vocab_size
    N, K, H = config.num_heads, num_kv_heads, config.head_dim
    # Every layer parameter carries a leading L axis (stacked for nn.scan).
    expected = {
        "embed/embedding": (V, D),
        "layers/attn_norm/scale": (L, D),
        "layers/attn/q_proj": (L, D, N, H),
        "layers/attn/k_proj": (L, D, K, H),
        "layers/attn/v_proj": (L, D, K, H),
        "layers/attn/o_proj": (L, N, H, D),
        "layers/mlp_norm/scale": (L, D),
        "layers/mlp/gate_proj": (L, D, F),
        "layers/mlp/up_proj": (L, D, F),
        "layers/mlp/down_proj": (L, F, D),
        "final_norm/scale": (D,),
    }
    if not tie_embeddings:
        expected["lm_head"] = (D, V)

    shapes = flax.traverse_util.flatten_dict(param_shapes(config), sep="/")

    assert {name: leaf.shape for name, leaf in shapes.items()} == expected
    assert all(leaf.dtype == jnp.float32 for leaf in shapes.values())
    assert count_params(shapes) == config.num_params()


def test_positions_from_mask():
    mask = jnp.asarray([[False, False, True, True], [True, True, True, True]])

    positions = positions_from_mask(mask)

    np.testing.assert_array_equal(positions, [[0, 0, 0, 1], [0, 1, 2, 3]])


# --- RoPE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim, theta", [(16, 10000.0), (64, 500000.0)])
def test_rope_inverse_frequencies_closed_form(head_dim, theta):
    actual = rope_inverse_frequencies(head_dim, theta, None)

    # theta ** (-2i / H) for i = 0 .. H/2 - 1, in float64.
    i = np.arange(head_dim // 2, dtype=np.float64)
    expected = theta ** (-2.0 * i / head_dim)

    assert actual.dtype == np.float32
    # A few float32 ulps (eps 1.2e-7) from the float32 power and reciprocal.
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=0)


def llama31_scaled_frequencies(frequencies, factor, low_freq_factor, high_freq_factor, original):
    """The Llama 3.1 three-band rule, one frequency at a time in float64."""
    low_freq_wavelength = original / low_freq_factor
    high_freq_wavelength = original / high_freq_factor
    scaled = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < high_freq_wavelength:
            scaled.append(frequency)
        elif wavelength > low_freq_wavelength:
            scaled.append(frequency / factor)
        else:
            band_width = high_freq_factor - low_freq_factor
            smooth = (original / wavelength - low_freq_factor) / band_width
            scaled.append((1 - smooth) * frequency / factor + smooth * frequency)
    return np.asarray(scaled)


def test_rope_llama31_scaling_three_bands():
    head_dim, theta = 64, 500000.0
    unscaled = rope_inverse_frequencies(head_dim, theta, None)
    actual = rope_inverse_frequencies(head_dim, theta, LLAMA31_SCALING)

    base = theta ** (-2.0 * np.arange(head_dim // 2) / head_dim)
    expected = llama31_scaled_frequencies(base, 32.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=0)

    # Band limits: wavelengths below 8192 / 4 = 2048 keep their frequency, above 8192 / 1 they
    # are divided by 32. Wavelength 2*pi * 500000 ** (i / 32) crosses 2048 between i = 14
    # (1956) and 15 (2948), and 8192 between i = 17 (6695) and 18 (10089).
    wavelength = 2 * math.pi / base
    high = wavelength < 2048
    low = wavelength > 8192
    middle = ~high & ~low
    assert (high.sum(), middle.sum(), low.sum()) == (15, 3, 14)

    np.testing.assert_array_equal(actual[high], unscaled[high])
    np.testing.assert_allclose(actual[low], unscaled[low] / 32.0, rtol=1e-6, atol=0)
    assert np.all(actual[middle] > unscaled[middle] / 32.0)
    assert np.all(actual[middle] < unscaled[middle])


def rotate(x, positions, inv_freq):
    """Rotate x [B, T, heads, H] at integer positions [B, T]."""
    cos, sin = rope_angles(jnp.asarray(positions, jnp.int32), inv_freq)
    return apply_rope(jnp.asarray(x, jnp.float32), cos, sin)


def test_apply_rope_preserves_norms():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    positions = rng.integers(0, 1000, size=(2, 5))
    inv_freq = rope_inverse_frequencies(16, 10000.0, None)

    rotated = rotate(x, positions, inv_freq)

    np.testing.assert_allclose(
        np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("scaling", [None, LLAMA31_SCALING])
def test_apply_rope_relative_position_invariance(scaling):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, 1, 1, 64)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, 64)).astype(np.float32)
    inv_freq = rope_inverse_frequencies(64, 500000.0, scaling)

    def score(query_position, key_position):
        rotated_q = rotate(q, [[query_position]], inv_freq)
        rotated_k = rotate(k, [[key_position]], inv_freq)
        return float(jnp.sum(rotated_q * rotated_k))

    # Same offset 3 at different absolute positions: same score. Angles up to 300 rad carry a
    # float32 rounding of about 300 * 6e-8 = 2e-5 rad, far below atol 1e-4 on scores of order 8.
    reference = score(3, 0)
    for query_position, key_position in [(10, 7), (50, 47), (300, 297)]:
        np.testing.assert_allclose(
            score(query_position, key_position), reference, rtol=0, atol=1e-4,
            err_msg=f"positions ({query_position}, {key_position})",
        )

    # Offset 0 is no rotation at all, and a different offset gives a different score.
    np.testing.assert_allclose(score(7, 7), float(np.sum(q * k)), rtol=0, atol=1e-4)
    assert abs(score(4, 0) - reference) > 1e-2


# --- RMSNorm ---------------------------------------------------------------------------------


def test_rms_norm_matches_numpy_formula():
    rng = np.random.default_rng(4)
    # A non-zero mean checks that RMSNorm does not subtract it (unlike LayerNorm).
    x = (rng.normal(size=(2, 3, 64)) + 0.5).astype(np.float32)
    scale = rng.normal(size=(64,)).astype(np.float32)
    eps = 1e-5

    actual = RMSNorm(eps).apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x))

    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps) * scale
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_casts_to_compute_dtype():
    x = jnp.ones((1, 4), jnp.bfloat16)

    actual = RMSNorm(1e-5, jnp.bfloat16).apply({"params": {"scale": jnp.ones(4)}}, x)

    assert actual.dtype == jnp.bfloat16


# --- masking -------------------------------------------------------------------------------


@pytest.mark.parametrize("tie_embeddings", TIED)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_future_token_does_not_change_earlier_logits(
    tiny_model_config, make_params, num_kv_heads, tie_embeddings
):
    config = dataclasses.replace(
        tiny_model_config, num_kv_heads=num_kv_heads, tie_embeddings=tie_embeddings
    )
    params = make_params(config)
    tokens = random_tokens(config, (BATCH, SEQ_LEN), seed=5)
    changed_at = 6
    changed = tokens.at[:, changed_at].set((tokens[:, changed_at] + 1) % config.vocab_size)

    before = full_logits(params, config, tokens)
    after = full_logits(params, config, changed)

    np.testing.assert_allclose(after[:, :changed_at], before[:, :changed_at], rtol=0, atol=1e-6)
    # The changed token itself and every later one must see the change.
    difference = jnp.abs(after - before).max(axis=-1)
    assert bool(jnp.all(difference[:, changed_at:] > 1e-3))


@pytest.mark.parametrize("tie_embeddings", TIED)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_masked_pad_tokens_do_not_change_logits(
    tiny_model_config, make_params, num_kv_heads, tie_embeddings
):
    config = dataclasses.replace(
        tiny_model_config, num_kv_heads=num_kv_heads, tie_embeddings=tie_embeddings
    )
    params = make_params(config)
    tokens = random_tokens(config, (BATCH, SEQ_LEN), seed=6)
    # Row 0 has 4 left pads, row 1 has 1.
    mask = jnp.arange(SEQ_LEN)[None, :] >= jnp.asarray([[4], [1]])
    other_pads = random_tokens(config, (BATCH, SEQ_LEN), seed=7)

    baseline = full_logits(params, config, jnp.where(mask, tokens, 0), mask)
    repadded = full_logits(params, config, jnp.where(mask, tokens, other_pads), mask)

    real = np.asarray(mask)
    np.testing.assert_allclose(
        np.asarray(repadded)[real], np.asarray(baseline)[real], rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_attention_equals_repeated_kv_heads(
    tiny_model_config, make_params, num_kv_heads
):
    # Query head n reads kv head n // G, so repeating each kv head G times in place gives a
    # multi-head model (K = N) with the same output.
    grouped = dataclasses.replace(tiny_model_config, num_kv_heads=num_kv_heads)
    full = dataclasses.replace(tiny_model_config, num_kv_heads=tiny_model_config.num_heads)
    params = make_params(grouped)
    attn = dict(params["layers"]["attn"])
    for name in ("k_proj", "v_proj"):
        attn[name] = jnp.repeat(attn[name], grouped.group_size, axis=2)
    repeated = {**params, "layers": {**params["layers"], "attn": attn}}
    tokens = random_tokens(grouped, (BATCH, SEQ_LEN), seed=8)

    actual = full_logits(params, grouped, tokens)
    expected = full_logits(repeated, full, tokens)

    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


# --- cached decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("tie_embeddings", TIED)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_cached_decode_matches_full_forward(
    tiny_model_config, make_params, num_kv_heads, tie_embeddings
):
    config = dataclasses.replace(
        tiny_model_config, num_kv_heads=num_kv_heads, tie_embeddings=tie_embeddings
    )
    params = make_params(config)
    prompt = random_tokens(config, (BATCH, PROMPT_LEN), seed=9)
    positions = jnp.broadcast_to(jnp.arange(SEQ_LEN), (BATCH, SEQ_LEN))
    cache = KVCache.allocate(config, BATCH, SEQ_LEN, jnp.float32)

    # Prefill the prompt, then feed back the greedy token one position at a time.
    logits, cache = jit_forward(
        params, prompt, positions[:, :PROMPT_LEN], config=config, cache=cache
    )
    step_logits = [logits]
    tokens = [prompt]
    for t in range(PROMPT_LEN, SEQ_LEN):
        next_token = jnp.argmax(step_logits[-1][:, -1], axis=-1).astype(jnp.int32)[:, None]
        tokens.append(next_token)
        logits, cache = jit_forward(
            params, next_token, positions[:, t:t + 1], config=config, cache=cache
        )
        step_logits.append(logits)
    tokens = jnp.concatenate(tokens, axis=1)
    cached = jnp.concatenate(step_logits, axis=1)

    uncached = full_logits(params, config, tokens)

    assert int(cache.end) == SEQ_LEN
    np.testing.assert_array_equal(cache.lengths, [SEQ_LEN] * BATCH)
    for t in range(SEQ_LEN):
        np.testing.assert_allclose(
            cached[:, t], uncached[:, t], rtol=0, atol=CACHE_ATOL, err_msg=f"position {t}"
        )
    # Every greedy token chosen with the cache is also the argmax of the full forward.
    np.testing.assert_array_equal(
        jnp.argmax(uncached[:, PROMPT_LEN - 1:-1], axis=-1), tokens[:, PROMPT_LEN:]
    )


# Each kv-head grouping once and both head kinds: the head only acts after the layers, where
# chunking has no effect, and every new chunk size costs one compile per config.
@pytest.mark.parametrize("num_kv_heads, tie_embeddings", [(1, False), (2, True), (4, False)])
def test_chunked_prefill_matches_full_forward(
    tiny_model_config, make_params, num_kv_heads, tie_embeddings
):
    config = dataclasses.replace(
        tiny_model_config, num_kv_heads=num_kv_heads, tie_embeddings=tie_embeddings
    )
    params = make_params(config)
    assert sum(CHUNK_SIZES) == SEQ_LEN
    tokens = random_tokens(config, (BATCH, SEQ_LEN), seed=10)
    positions = jnp.broadcast_to(jnp.arange(SEQ_LEN), (BATCH, SEQ_LEN))
    cache = KVCache.allocate(config, BATCH, SEQ_LEN, jnp.float32)

    uncached = full_logits(params, config, tokens)

    start = 0
    for size in CHUNK_SIZES:
        chunk = slice(start, start + size)
        logits, cache = jit_forward(
            params, tokens[:, chunk], positions[:, chunk], config=config, cache=cache
        )
        np.testing.assert_allclose(
            logits, uncached[:, chunk], rtol=0, atol=CACHE_ATOL, err_msg=f"chunk at {start}"
        )
        start += size
    assert int(cache.end) == SEQ_LEN


# --- the decoding layout ---------------------------------------------------------------------


@pytest.mark.parametrize("tie_embeddings", TIED)
def test_decode_params_layout(tiny_model_config, make_params, tie_embeddings):
    config = dataclasses.replace(tiny_model_config, num_kv_heads=2, tie_embeddings=tie_embeddings)
    params = make_params(config)
    decoding = prepare_decode_params(params, config, jnp.bfloat16)
    D, N, K, H, F = (config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim,
                     config.mlp_dim)

    assert len(decoding.layers) == config.num_layers
    assert (decoding.head is None) == tie_embeddings
    layers = params["layers"]
    for i, layer in enumerate(decoding.layers):
        assert layer["qkv"].shape == ((N + 2 * K) * H, D)
        assert layer["o"].shape == (D, N * H)
        assert layer["gate_up"].shape == (2 * F, D)
        assert layer["down"].shape == (D, F)
        for name in ("qkv", "o", "gate_up", "down"):
            assert layer[name].dtype == jnp.bfloat16, name
        assert layer["attn_norm"].dtype == jnp.float32
        # Row r of the fused [out, in] matrix is output column r of the trained kernels.
        k_row = N * H + 3
        k_column = layers["attn"]["k_proj"][i].reshape(D, K * H)[:, 3]
        np.testing.assert_array_equal(layer["qkv"][k_row], k_column.astype(jnp.bfloat16))
        np.testing.assert_array_equal(
            layer["gate_up"][F + 5], layers["mlp"]["up_proj"][i][:, 5].astype(jnp.bfloat16)
        )


@pytest.mark.parametrize("tie_embeddings", TIED)
def test_prepared_params_give_same_cached_logits(tiny_model_config, make_params, tie_embeddings):
    config = dataclasses.replace(tiny_model_config, tie_embeddings=tie_embeddings)
    params = make_params(config)
    tokens = random_tokens(config, (BATCH, PROMPT_LEN), seed=11)
    positions = jnp.broadcast_to(jnp.arange(PROMPT_LEN), (BATCH, PROMPT_LEN))

    results = []
    for weights in (params, prepare_decode_params(params, config)):
        cache = KVCache.allocate(config, BATCH, SEQ_LEN, jnp.float32)
        logits, _ = jit_forward(weights, tokens, positions, config=config, cache=cache)
        results.append(logits)
    # Inside jit XLA may fold the layout change of raw parameters into the prefill matmuls,
    # which regroups their float32 sums, so the two agree to rounding only.
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=CACHE_ATOL)


def test_decode_params_for_other_model_raise(tiny_model_config, make_params):
    params = make_params(tiny_model_config)
    decoding = prepare_decode_params(params, tiny_model_config)
    deeper = dataclasses.replace(tiny_model_config, num_layers=tiny_model_config.num_layers + 1)
    untied = dataclasses.replace(tiny_model_config, tie_embeddings=False)
    wider = dataclasses.replace(tiny_model_config, mlp_dim=tiny_model_config.mlp_dim * 2)
    with pytest.raises(ValueError, match="layers but model.num_layers"):
        prepare_decode_params(decoding, deeper)
    with pytest.raises(ValueError, match="tie_embeddings"):
        prepare_decode_params(decoding, untied)
    with pytest.raises(ValueError, match="kernel gate_up has shape"):
        prepare_decode_params(decoding, wider)


def test_cached_out_of_vocab_token_gives_nan(tiny_model_config, make_params):
    params = make_params(tiny_model_config)
    tokens = jnp.asarray([[5, tiny_model_config.vocab_size + 3]], jnp.int32)
    positions = jnp.asarray([[0, 1]], jnp.int32)
    cache = KVCache.allocate(tiny_model_config, 1, 4, jnp.float32)
    cached, _ = forward(params, tokens, positions, config=tiny_model_config, cache=cache)
    uncached, _ = forward(params, tokens, positions, config=tiny_model_config)
    assert not np.isfinite(np.asarray(cached[0, 1])).any()
    assert not np.isfinite(np.asarray(uncached[0, 1])).any()


def test_decode_params_without_cache_raise(tiny_model_config, make_params):
    params = make_params(tiny_model_config)
    decoding = prepare_decode_params(params, tiny_model_config)
    tokens = random_tokens(tiny_model_config, (1, 4), seed=12)
    with pytest.raises(ValueError, match="only work with a KVCache"):
        forward(decoding, tokens, jnp.zeros((1, 4), jnp.int32), config=tiny_model_config)
