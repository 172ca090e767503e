"""Batched autoregressive generation with a KV cache: one prefill, then a `lax.scan` of decode steps.

`generate` is one jitted program: it allocates the cache, prefills a left-padded prompt batch,
and scans over the new tokens with no host synchronisation per token. The prompt length T and
`max_new_tokens` are the only shape parameters, so `generate_text` pads prompts up to a bucket
length and a new prompt within the same bucket reuses the compiled program. Sampling knobs are
traced arrays and never force a recompile. The weights are laid out for decoding once per call,
before the decode loop (see `jaxllm.model.prepare_decode_params`). When every row decodes greedily,
a `lax.cond` skips the top-k and top-p filters (two sorts over the vocabulary) and the
categorical draw, which took about a quarter of a greedy seed-190m decode step on 2 CPU cores
(docs/benchmarks.md).

`default_decode_dtype` picks the compute dtype for decoding by backend: float32 on CPU, where
XLA computes bfloat16 matmuls in float32 anyway and the extra conversions make bfloat16 no
faster, and bfloat16 on GPU and TPU, where it halves the weight bytes read per token.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import EOT_TOKEN
from jaxllm.errors import UserInputError
from jaxllm.kv_cache import KVCache
from jaxllm.losses import token_log_probs
from jaxllm.model import forward, positions_from_mask, prepare_decode_params
from jaxllm.sampling import MIN_TEMPERATURE, sample_token

# Smallest prompt bucket; buckets double from here up to the context length.
MIN_PROMPT_BUCKET = 16


def default_decode_dtype(backend: str | None = None) -> jnp.dtype:
    """Return the compute dtype for decoding on `backend` (default: `jax.default_backend()`).

    float32 on "cpu", bfloat16 on every other backend.
    """
    backend = backend or jax.default_backend()
    return jnp.dtype(jnp.float32 if backend == "cpu" else jnp.bfloat16)


class GenerateOutput(NamedTuple):
    """New tokens [B, N], their log-probabilities [B, N] and the completion mask [B, N].

    `logprobs` are under the model's own distribution (temperature 1, no top-k or top-p), the
    policy probabilities that RL losses need. `mask` is True from the first new token up to and
    including the first stop token; later slots hold `pad_id` and count for nothing.
    """

    tokens: jnp.ndarray
    logprobs: jnp.ndarray
    mask: jnp.ndarray


def generate(
    params,
    prompt_tokens: jnp.ndarray,
    prompt_mask: jnp.ndarray,
    rng: jax.Array,
    *,
    config: ModelConfig,
    max_new_tokens: int,
    temperature,
    top_k,
    top_p,
    stop_ids,
    pad_id: int,
    compute_dtype: Any = jnp.float32,
    cache_dtype: Any = None,
) -> GenerateOutput:
    """Generate `max_new_tokens` tokens for each row of a left-padded prompt batch.

    params: the trained parameters, or `prepare_decode_params(params, config, compute_dtype)`
    made once by a caller that generates many times; raw parameters are laid out for decoding
    inside every call. prompt_tokens, prompt_mask: [B, T]; every row needs at least one real
    token, and the last column must be real (left padding). stop_ids: [num_stop] int32; a row
    stops after emitting one of them. temperature, top_k, top_p: scalars or [B] arrays (see
    `sample_token`).
    The knobs are cast to fixed dtypes here, so `temperature=1` and `temperature=1.0` share
    one compiled program.
    """
    return _generate(
        params,
        jnp.asarray(prompt_tokens, jnp.int32),
        jnp.asarray(prompt_mask, bool),
        rng,
        config=config,
        max_new_tokens=max_new_tokens,
        temperature=jnp.asarray(temperature, jnp.float32),
        top_k=jnp.asarray(top_k, jnp.int32),
        top_p=jnp.asarray(top_p, jnp.float32),
        stop_ids=jnp.asarray(stop_ids, jnp.int32).reshape(-1),
        pad_id=jnp.asarray(pad_id, jnp.int32),
        compute_dtype=compute_dtype,
        cache_dtype=cache_dtype,
    )


@functools.partial(
    jax.jit, static_argnames=("config", "max_new_tokens", "compute_dtype", "cache_dtype")
)
def _generate(
    params,
    prompt_tokens: jnp.ndarray,
    prompt_mask: jnp.ndarray,
    rng: jax.Array,
    *,
    config: ModelConfig,
    max_new_tokens: int,
    temperature,
    top_k,
    top_p,
    stop_ids: jnp.ndarray,
    pad_id: int,
    compute_dtype: Any = jnp.float32,
    cache_dtype: Any = None,
) -> GenerateOutput:
    B, T = prompt_tokens.shape
    cache = KVCache.allocate(config, B, T + max_new_tokens, cache_dtype or compute_dtype)
    decode_params = prepare_decode_params(params, config, compute_dtype)
    run = functools.partial(forward, decode_params, config=config, compute_dtype=compute_dtype)
    sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
    stop_ids = jnp.asarray(stop_ids, jnp.int32)
    # sample_token also returns the argmax for a greedy row, so the fast path changes no token.
    all_greedy = jnp.all(temperature < MIN_TEMPERATURE)

    def greedy(logits, step_rng):
        del step_rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def choose(logits, step_rng, done):
        """Sample, replace the tokens of finished rows with padding, and update `done`."""
        token = jax.lax.cond(all_greedy, greedy, sample, logits, step_rng)
        logprob = token_log_probs(logits[:, None, :], token[:, None])[:, 0]
        token = jnp.where(done, pad_id, token)
        emitted = ~done
        done = done | jnp.isin(token, stop_ids)
        return token, logprob, emitted, done

    # 1. Prefill: the whole prompt in one forward; the last column predicts the first token.
    positions = positions_from_mask(prompt_mask)
    logits, cache = run(prompt_tokens, positions, mask=prompt_mask, cache=cache)
    step_rngs = jax.random.split(rng, max_new_tokens)
    done = jnp.zeros((B,), bool)
    token, logprob, emitted, done = choose(logits[:, -1], step_rngs[0], done)

    # 2. Decode: each step feeds the previous token at the next position of its row.
    def decode_step(carry, step_rng):
        cache, token, position, done = carry
        logits, cache = run(token[:, None], position[:, None], cache=cache)
        new_token, logprob, emitted, done = choose(logits[:, 0], step_rng, done)
        return (cache, new_token, position + 1, done), (new_token, logprob, emitted)

    carry = (cache, token, positions[:, -1] + 1, done)
    _, (tokens, logprobs, emitted_mask) = jax.lax.scan(decode_step, carry, step_rngs[1:])

    # 3. Put the first token in front of the scanned ones: [B, N].
    tokens = jnp.concatenate([token[:, None], tokens.T], axis=1)
    logprobs = jnp.concatenate([logprob[:, None], logprobs.T], axis=1)
    mask = jnp.concatenate([emitted[:, None], emitted_mask.T], axis=1)
    return GenerateOutput(tokens=tokens, logprobs=jnp.where(mask, logprobs, 0.0), mask=mask)


def prompt_bucket(length: int, limit: int) -> int:
    """Round a prompt length up to a power of two (at least MIN_PROMPT_BUCKET), capped at limit."""
    bucket = MIN_PROMPT_BUCKET
    while bucket < length:
        bucket *= 2
    return max(min(bucket, limit), length)


def left_pad(
    token_lists: Sequence[Sequence[int]], pad_id: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to `length`; returns int32 tokens [B, length] and bool mask [B, length]."""
    tokens = np.full((len(token_lists), length), pad_id, np.int32)
    mask = np.zeros((len(token_lists), length), bool)
    for row, ids in enumerate(token_lists):
        if ids:
            tokens[row, length - len(ids):] = ids
            mask[row, length - len(ids):] = True
    return tokens, mask


def stop_token_ids(tokenizer) -> list[int]:
    """End of text, plus the end-of-turn token that Llama 3 chat models emit after an answer."""
    return [tokenizer.eos_id, tokenizer.token_id(EOT_TOKEN)]


def generate_text(
    params,
    tokenizer,
    prompts: Sequence[str],
    *,
    config: ModelConfig,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    compute_dtype: Any = jnp.float32,
) -> list[str]:
    """Complete each prompt (BOS is prepended) and return the decoded new text per prompt."""
    if not prompts:
        raise UserInputError("no prompt given; pass at least one prompt")
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    encoded = [tokenizer.encode(prompt, add_bos=True) for prompt in prompts]
    for index, ids in enumerate(encoded):
        needed = len(ids) + max_new_tokens
        if needed > config.max_seq_len:
            raise UserInputError(
                f"prompt {index + 1} is {len(ids)} tokens and with {max_new_tokens} new tokens "
                f"needs {needed} positions, more than model.max_seq_len ({config.max_seq_len}); "
                "shorten the prompt or lower the number of new tokens"
            )

    longest = max(len(ids) for ids in encoded)
    length = prompt_bucket(longest, config.max_seq_len - max_new_tokens)
    tokens, mask = left_pad(encoded, tokenizer.pad_id, length)
    output = generate(
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(seed),
        config=config,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=jnp.asarray(stop_token_ids(tokenizer), jnp.int32),
        pad_id=tokenizer.pad_id,
        compute_dtype=compute_dtype,
    )
    new_tokens = np.asarray(output.tokens)
    new_mask = np.asarray(output.mask)
    completions = []
    for row in range(len(prompts)):
        ids = [int(t) for t, keep in zip(new_tokens[row], new_mask[row]) if keep]
        completions.append(tokenizer.decode(ids))
    return completions
