"""Tests of batched generation: left padding, stop tokens, log-probabilities, seeds, recompiles.

One float32 model shape (2 layers, 2 kv heads, tied head) and one prompt batch shape serve
most tests, so `generate` compiles only a few times.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.data.tokenizer import train_tokenizer
from jaxllm.errors import UserInputError
from jaxllm.generate import generate, generate_text, left_pad, prompt_bucket
from jaxllm.model import forward, positions_from_mask

NEW_TOKENS = 8
PAD_ID = 0
# Prompts of different lengths, left-padded to the longest (7) in a batch.
PROMPT_LENGTHS = (3, 7, 5)
# Token ids start at 1 so that no prompt token equals PAD_ID.
PROMPTS = [
    np.random.default_rng(seed).integers(1, 128, length).tolist()
    for seed, length in enumerate(PROMPT_LENGTHS)
]
# Cached (generate) and uncached (forward) log-probabilities agree to float32 rounding, which
# is about 1e-6 for this model.
ATOL = 1e-5

jit_forward = jax.jit(forward, static_argnames=("config", "compute_dtype"))


@pytest.fixture(scope="module")
def model(tiny_model_config, make_params):
    return tiny_model_config, make_params(tiny_model_config)


def run_generate(
    model, tokens, mask, *, seed=0, temperature=0.0, top_k=0, top_p=1.0, stop_ids=None
):
    """Call `generate` with float32 compute. Without stop_ids no token stops a row."""
    config, params = model
    if stop_ids is None:
        # vocab_size is one past the largest token id, so it is never emitted.
        stop_ids = [config.vocab_size]
    return generate(
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(seed),
        config=config,
        max_new_tokens=NEW_TOKENS,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=jnp.asarray(stop_ids, jnp.int32),
        pad_id=PAD_ID,
    )


def padded_batch():
    return left_pad(PROMPTS, PAD_ID, max(PROMPT_LENGTHS))


def full_logits(model, tokens, mask):
    config, params = model
    logits, _ = jit_forward(
        params, jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), config=config,
        mask=jnp.asarray(mask),
    )
    return np.asarray(logits)


# --- helpers ---------------------------------------------------------------------------------


def test_left_pad():
    tokens, mask = left_pad([[5, 6], [7, 8, 9], []], pad_id=2, length=4)

    np.testing.assert_array_equal(tokens, [[2, 2, 5, 6], [2, 7, 8, 9], [2, 2, 2, 2]])
    np.testing.assert_array_equal(
        mask, [[False, False, True, True], [False, True, True, True], [False] * 4]
    )
    assert tokens.dtype == np.int32


@pytest.mark.parametrize(
    "length, limit, expected",
    [
        (1, 60, 16),
        (16, 60, 16),
        (17, 60, 32),
        (32, 60, 32),
        # Bucket 64 is capped at the limit, but never below the prompt length.
        (33, 60, 60),
        (61, 60, 61),
    ],
)
def test_prompt_bucket(length, limit, expected):
    assert prompt_bucket(length, limit) == expected


# --- generate --------------------------------------------------------------------------------


def test_output_shapes_and_dtypes(model):
    tokens, mask = padded_batch()

    output = run_generate(model, tokens, mask)

    expected_shape = (len(PROMPTS), NEW_TOKENS)
    assert output.tokens.shape == expected_shape
    assert output.logprobs.shape == expected_shape
    assert output.mask.shape == expected_shape
    assert output.tokens.dtype == jnp.int32
    assert output.logprobs.dtype == jnp.float32
    assert output.mask.dtype == jnp.bool_
    assert bool(jnp.all(output.mask))
    assert bool(jnp.all(output.logprobs <= 0))


def test_left_padded_batch_decodes_like_each_prompt_alone(model):
    tokens, mask = padded_batch()

    batch = run_generate(model, tokens, mask)

    for row, prompt in enumerate(PROMPTS):
        alone = run_generate(model, [prompt], [[True] * len(prompt)])
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0], err_msg=f"row {row}")
        np.testing.assert_allclose(
            batch.logprobs[row], alone.logprobs[0], rtol=0, atol=ATOL, err_msg=f"row {row}"
        )


def test_left_padded_forward_matches_each_prompt_alone(model):
    tokens, mask = padded_batch()

    batch = full_logits(model, tokens, mask)

    for row, prompt in enumerate(PROMPTS):
        alone = full_logits(model, [prompt], [[True] * len(prompt)])
        np.testing.assert_allclose(
            batch[row][mask[row]], alone[0], rtol=0, atol=ATOL, err_msg=f"row {row}"
        )


def test_stop_token_ends_row(model):
    tokens, mask = padded_batch()
    free = np.asarray(run_generate(model, tokens, mask).tokens)
    # Stop at the first token of row 0 that did not occur earlier in the row, so that row
    # emits some tokens, then the stop token, then padding.
    first_new = [j for j in range(1, NEW_TOKENS - 1) if free[0, j] not in free[0, :j]]
    assert first_new, f"greedy row 0 repeats one token: {free[0]}"
    stop_id = int(free[0, first_new[0]])

    stopped = run_generate(model, tokens, mask, stop_ids=[stop_id])

    stopped_tokens = np.asarray(stopped.tokens)
    stopped_mask = np.asarray(stopped.mask)
    stopped_logprobs = np.asarray(stopped.logprobs)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free[row] == stop_id)
        end = hits[0] + 1 if hits.size else NEW_TOKENS
        # Up to and including the stop token the row is unchanged and counted.
        np.testing.assert_array_equal(
            stopped_tokens[row, :end], free[row, :end], err_msg=f"row {row}"
        )
        assert stopped_mask[row, :end].all(), f"row {row}: {stopped_mask[row]}"
        # After it: padding, masked out, log-probability 0.
        np.testing.assert_array_equal(stopped_tokens[row, end:], PAD_ID, err_msg=f"row {row}")
        assert not stopped_mask[row, end:].any(), f"row {row}: {stopped_mask[row]}"
        np.testing.assert_array_equal(stopped_logprobs[row, end:], 0.0, err_msg=f"row {row}")
    assert stopped_tokens[0, first_new[0]] == stop_id
    assert not stopped_mask[0, -1]


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.0, 0, 1.0), (0.8, 5, 0.9)],
)
def test_logprobs_equal_full_forward_log_softmax(model, temperature, top_k, top_p):
    tokens, mask = padded_batch()
    T = tokens.shape[1]

    output = run_generate(
        model, tokens, mask, seed=1, temperature=temperature, top_k=top_k, top_p=top_p
    )

    # Logits at position T - 1 + j of prompt + completion predict new token j.
    new_tokens = np.asarray(output.tokens)
    sequence = np.concatenate([tokens, new_tokens], axis=1)
    sequence_mask = np.concatenate([mask, np.ones_like(new_tokens, bool)], axis=1)
    logits = full_logits(model, sequence, sequence_mask)[:, T - 1:-1]
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    expected = np.take_along_axis(log_probs, new_tokens[..., None], axis=-1)[..., 0]

    # The reported log-probabilities are those of the unfiltered model distribution.
    np.testing.assert_allclose(output.logprobs, expected, rtol=0, atol=ATOL)
    if temperature == 0.0:
        np.testing.assert_array_equal(new_tokens, logits.argmax(axis=-1))
    else:
        # Each sampled token is among the top_k logits of its step.
        ranks = (logits > np.take_along_axis(logits, new_tokens[..., None], axis=-1)).sum(axis=-1)
        assert ranks.max() < top_k


def test_same_seed_same_samples(model):
    tokens, mask = padded_batch()

    first = run_generate(model, tokens, mask, seed=3, temperature=1.0)
    second = run_generate(model, tokens, mask, seed=3, temperature=1.0)
    other = run_generate(model, tokens, mask, seed=4, temperature=1.0)

    np.testing.assert_array_equal(first.tokens, second.tokens)
    np.testing.assert_array_equal(first.logprobs, second.logprobs)
    # 3 rows of 8 tokens from a vocabulary of 128: two seeds agreeing on all of them would
    # take a near-deterministic model, which random weights with init_std 0.1 are not.
    assert not np.array_equal(first.tokens, other.tokens)


def test_sampling_knobs_do_not_recompile(model, compile_counts):
    tokens, mask = padded_batch()

    run_generate(model, tokens, mask)
    compiled = compile_counts["jit(_generate)"]
    for seed, temperature, top_k, top_p in [(1, 1.0, 0, 1.0), (2, 0.7, 5, 0.9), (3, 1.5, 64, 0.5)]:
        run_generate(
            model, tokens, mask, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p
        )

    assert compile_counts["jit(_generate)"] == compiled


# --- generate_text ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(tiny_model_config, make_params):
    """A byte-level BPE trained on a few sentences, and a model sized to its vocabulary."""
    text = "the quick brown fox jumps over the lazy dog. " * 20
    tokenizer = train_tokenizer([text], vocab_size=300)
    config = dataclasses.replace(tiny_model_config, vocab_size=tokenizer.vocab_size)
    return tokenizer, config, make_params(config)


def complete(text_model, prompts, max_new_tokens=4, seed=0):
    tokenizer, config, params = text_model
    return generate_text(
        params, tokenizer, prompts, config=config, max_new_tokens=max_new_tokens,
        temperature=0.8, top_k=0, top_p=0.95, seed=seed,
    )


def test_generate_text_reuses_bucket_compile(text_model, compile_counts):
    tokenizer, config, _ = text_model
    short, longer = "fox", "the lazy dog jumps"
    # Every prompt gets BOS. max_new_tokens 4 leaves a bucket limit of 64 - 4 = 60, and both
    # lengths round up to the smallest bucket, 16.
    lengths = [len(tokenizer.encode(prompt, add_bos=True)) for prompt in (short, longer)]
    assert lengths[0] != lengths[1]
    assert [prompt_bucket(length, 60) for length in lengths] == [16, 16], lengths

    # No other test uses this model, so the first call compiles once. That also shows that
    # the counter records compilations of `generate`.
    first = complete(text_model, [short, short])
    assert compile_counts["jit(_generate)"] == 1
    second = complete(text_model, [longer, short], seed=1)
    again = complete(text_model, [longer, short], seed=1)

    assert compile_counts["jit(_generate)"] == 1
    assert len(first) == 2 and all(isinstance(text, str) for text in first)
    assert second == again


def test_generate_text_rejects_prompt_longer_than_context(text_model):
    tokenizer, config, _ = text_model
    prompt = "xq zv " * 40
    length = len(tokenizer.encode(prompt, add_bos=True))
    assert length > config.max_seq_len

    with pytest.raises(UserInputError) as raised:
        complete(text_model, ["fox", prompt])

    message = str(raised.value)
    assert f"prompt 2 is {length} tokens" in message
    assert f"needs {length + 4} positions" in message
    assert f"model.max_seq_len ({config.max_seq_len})" in message


def test_generate_text_rejects_prompt_without_room_for_new_tokens(text_model):
    tokenizer, config, _ = text_model
    # The pairs "xq" and "qx" do not occur in the training text, so no merge joins them and
    # the prompt is BOS plus 61 single-byte tokens, 62 in all. With 4 new tokens it needs 66
    # of the 64 positions.
    prompt = "xq" * 30 + "x"
    length = len(tokenizer.encode(prompt, add_bos=True))
    assert length == 62

    with pytest.raises(UserInputError, match="needs 66 positions"):
        complete(text_model, [prompt])
