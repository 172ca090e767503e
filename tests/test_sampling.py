"""Tests of next-token sampling: top-k, top-p, greedy decoding and sampled frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import FILTERED_LOGIT, filter_top_k, filter_top_p, sample_token

# Jitted once here: one compile per shape is much cheaper than the op-by-op compiles of eager
# calls. Knobs are traced arguments, so changing them reuses the compile.
jit_sample_token = jax.jit(sample_token)
jit_filter_top_k = jax.jit(filter_top_k)
jit_filter_top_p = jax.jit(filter_top_p)

# Upper 0.1% points of the chi-square distribution by degrees of freedom (standard tables).
# A correct sampler exceeds them with probability 0.001. The seeds are fixed, so a pass or a
# failure is reproducible.
CHI_SQUARE_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}
NUM_DRAWS = 40_000
LOGITS = np.asarray([0.5, -1.0, 2.0, 0.0, 1.5], np.float32)


def softmax(logits):
    shifted = np.exp(np.asarray(logits, np.float64) - np.max(logits))
    return shifted / shifted.sum()


def kept(filtered):
    return np.asarray(filtered) > FILTERED_LOGIT


def sample_counts(logits, seed, **knobs):
    """Draw NUM_DRAWS tokens from copies of one logits row and return the count of each token."""
    rows = jnp.broadcast_to(jnp.asarray(logits), (NUM_DRAWS, len(logits)))
    tokens = jit_sample_token(rows, jax.random.key(seed), **knobs)
    return np.bincount(np.asarray(tokens), minlength=len(logits))


def assert_frequencies_match(counts, probs):
    """Chi-square goodness of fit on the tokens with non-zero probability."""
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled tokens outside the support: {counts}"
    expected = counts.sum() * probs[support]
    statistic = float(np.sum((counts[support] - expected) ** 2 / expected))
    degrees_of_freedom = int(support.sum()) - 1
    assert statistic < CHI_SQUARE_999[degrees_of_freedom], (
        f"chi-square {statistic:.2f} with {degrees_of_freedom} degrees of freedom; "
        f"counts {counts.tolist()}, expected {np.round(expected).tolist()}"
    )


# --- top-p -----------------------------------------------------------------------------------


# Probabilities 0.5, 0.3, 0.2, stored out of order so the filter must sort. A token is kept
# when the mass of all more likely tokens is below p:
#   mass before 0.5 is 0, before 0.3 is 0.5, before 0.2 is 0.8.
#   p = 0.45: only 0.5 (0.5 is not below 0.45).
#   p = 0.5:  only 0.5 (the mass before 0.3 is exactly 0.5, not below it). NOTE: this case
#             sits on the boundary; float32 softmax rounds that mass to 0.50000006 here.
#   p = 0.6:  0.5 and 0.3, so 0.3 stays in although it carries the mass past 0.6.
#   p = 0.79: 0.5 and 0.3 (0.8 is not below 0.79).
#   p = 0.85: all three.
@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.45, [False, True, False]),
        (0.5, [False, True, False]),
        (0.6, [False, True, True]),
        (0.79, [False, True, True]),
        (0.85, [True, True, True]),
    ],
)
def test_top_p_keeps_token_that_crosses_threshold(top_p, expected):
    logits = jnp.log(jnp.asarray([[0.2, 0.5, 0.3]]))

    filtered = jit_filter_top_p(logits, top_p)

    np.testing.assert_array_equal(kept(filtered)[0], expected)
    # Kept logits pass through unchanged.
    keep = kept(filtered)
    np.testing.assert_array_equal(np.asarray(filtered)[keep], np.asarray(logits)[keep])


def test_top_p_one_keeps_everything_even_when_mass_saturates():
    # Token 0 carries all but about 8e-43 of the probability, so in float32 the mass before
    # every other token is already 1.0. top_p = 1 must still keep them all.
    logits = jnp.asarray([[100.0, 0.0, -100.0, 3.0]])

    np.testing.assert_array_equal(jit_filter_top_p(logits, 1.0), logits)


# --- top-k -----------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 5, 49, 50])
def test_top_k_keeps_exactly_k_largest(top_k):
    # A permutation of 0 .. 49 per row: distinct logits, so exactly k survive.
    rng = np.random.default_rng(0)
    logits = np.stack([rng.permutation(50) for _ in range(8)]).astype(np.float32)

    keep = kept(jit_filter_top_k(jnp.asarray(logits), top_k))

    np.testing.assert_array_equal(keep.sum(axis=-1), [top_k] * 8)
    np.testing.assert_array_equal(keep, logits >= 50 - top_k)


def test_top_k_keeps_all_ties_at_cutoff():
    logits = jnp.asarray([[3.0, 1.0, 1.0, 0.0]])

    keep = kept(jit_filter_top_k(logits, 2))

    np.testing.assert_array_equal(keep[0], [True, True, True, False])


def test_top_k_zero_keeps_everything():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 30)), jnp.float32)

    np.testing.assert_array_equal(jit_filter_top_k(logits, 0), logits)
    np.testing.assert_array_equal(jit_filter_top_p(logits, 1.0), logits)


def test_per_row_top_k():
    row = np.random.default_rng(2).permutation(20)
    logits = jnp.asarray(np.stack([row, row, row]), jnp.float32)

    keep = kept(jit_filter_top_k(logits, jnp.asarray([1, 4, 0])))

    np.testing.assert_array_equal(keep.sum(axis=-1), [1, 4, 20])


def test_per_row_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2]] * 3))

    keep = kept(jit_filter_top_p(logits, jnp.asarray([0.45, 0.6, 1.0])))

    np.testing.assert_array_equal(keep.sum(axis=-1), [1, 2, 3])


# --- sample_token ----------------------------------------------------------------------------


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.1), (1, 0.5)])
def test_temperature_zero_is_argmax(top_k, top_p):
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(256, 64)), jnp.float32)

    for seed in range(3):
        tokens = jit_sample_token(
            logits, jax.random.key(seed), temperature=0.0, top_k=top_k, top_p=top_p
        )
        assert tokens.dtype == jnp.int32
        np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampled_frequencies_match_softmax(temperature):
    counts = sample_counts(LOGITS, seed=4, temperature=temperature, top_k=0, top_p=1.0)

    assert_frequencies_match(counts, softmax(LOGITS / temperature))


def test_lower_temperature_concentrates_mass():
    # softmax(LOGITS) gives the top token (logit 2.0) probability 0.496; at temperature 0.5
    # it rises to 0.695 and at 2.0 it falls to 0.352. The least likely token (logit -1.0)
    # moves the other way: 0.002, 0.025, 0.079.
    cold = sample_counts(LOGITS, seed=5, temperature=0.5, top_k=0, top_p=1.0)
    warm = sample_counts(LOGITS, seed=5, temperature=1.0, top_k=0, top_p=1.0)
    hot = sample_counts(LOGITS, seed=5, temperature=2.0, top_k=0, top_p=1.0)

    assert cold[2] > warm[2] > hot[2]
    assert cold[1] < warm[1] < hot[1]


def test_top_p_applies_after_top_k():
    # top_k = 3 keeps logits 2.0, 1.5, 0.5 with renormalised probabilities 0.547, 0.332,
    # 0.122. On that distribution top_p = 0.85 drops 0.5 (mass before it 0.878), leaving
    # 0.623 and 0.377. Applied to the full softmax (0.496, 0.301, 0.111, ...) top_p would
    # keep logit 0.5 too (mass before it 0.797).
    counts = sample_counts(LOGITS, seed=6, temperature=1.0, top_k=3, top_p=0.85)

    expected = softmax(np.where(np.isin(LOGITS, [2.0, 1.5]), LOGITS, -np.inf))
    np.testing.assert_allclose(expected[[2, 4]], [0.6225, 0.3775], rtol=0, atol=1e-4)
    assert_frequencies_match(counts, expected)


def test_per_row_temperatures():
    # Even rows at temperature 0.5, odd rows at 2.0, all with the same logits.
    half = NUM_DRAWS // 2
    rows = jnp.broadcast_to(jnp.asarray(LOGITS), (NUM_DRAWS, len(LOGITS)))
    temperatures = jnp.tile(jnp.asarray([0.5, 2.0]), half)

    tokens = np.asarray(
        jit_sample_token(rows, jax.random.key(7), temperature=temperatures, top_k=0, top_p=1.0)
    )

    cold = np.bincount(tokens[0::2], minlength=len(LOGITS))
    hot = np.bincount(tokens[1::2], minlength=len(LOGITS))
    assert_frequencies_match(cold, softmax(LOGITS / 0.5))
    assert_frequencies_match(hot, softmax(LOGITS / 2.0))


def test_per_row_knobs_mix_greedy_and_sampling():
    # Rows 0 to 2 of each group of 4 are greedy by three different routes, and row 3 samples
    # freely. 200 copies of the group give 200 draws per row.
    group = np.random.default_rng(8).normal(size=(4, 16)).astype(np.float32)
    copies = 200
    logits = jnp.asarray(np.tile(group, (copies, 1)))
    temperature = jnp.tile(jnp.asarray([0.0, 1.0, 1.0, 1.0]), copies)
    top_k = jnp.tile(jnp.asarray([0, 1, 0, 0]), copies)
    top_p = jnp.tile(jnp.asarray([1.0, 1.0, 1e-3, 1.0]), copies)

    tokens = np.asarray(
        jit_sample_token(
            logits, jax.random.key(9), temperature=temperature, top_k=top_k, top_p=top_p
        )
    ).reshape(copies, 4)

    argmax = group.argmax(axis=-1)
    for row in range(3):
        np.testing.assert_array_equal(tokens[:, row], argmax[row], err_msg=f"row {row}")
    assert len(np.unique(tokens[:, 3])) > 5


def test_changing_knobs_does_not_recompile(compile_counts):
    logits = jnp.zeros((2, 8))

    jit_sample_token(logits, jax.random.key(0), temperature=0.0, top_k=0, top_p=1.0)
    compiled = compile_counts["jit(sample_token)"]
    for temperature, top_k, top_p in [(1.0, 3, 0.9), (0.5, 0, 0.2), (2.0, 8, 1.0)]:
        jit_sample_token(
            logits, jax.random.key(0), temperature=temperature, top_k=top_k, top_p=top_p
        )

    assert compile_counts["jit(sample_token)"] == compiled
    # A new logits shape must compile, which shows that the counter records compilations.
    jit_sample_token(jnp.zeros((3, 8)), jax.random.key(0), temperature=1.0, top_k=0, top_p=1.0)
    assert compile_counts["jit(sample_token)"] == compiled + 1
