"""The five ways of greedy decoding that the decode benchmark races against each other.

Every contender decodes unpadded prompts [B, T] greedily for N new tokens and returns them as
numpy [B, N]:

    jaxllm-cached        `jaxllm.generate.generate` at temperature 0: prefill, then a
                         `lax.scan` of decode steps in one jit, layers unrolled.
    jaxllm-cached-scan   the same with the layers under `lax.scan` (`scan_decode`).
    jaxllm-uncached      a full forward over the whole sequence for every new token, from a
                         host loop. Sequences are right-padded to a bucket length, so there is
                         one compile per bucket (see `bucket_length`). Causal attention keeps
                         the padding after the last real token from changing its logits.
    torchref-cached      `torchref.greedy_generate`: eager PyTorch with a preallocated cache.
    torchref-uncached    eager PyTorch, a full forward over the growing sequence per token.

The uncached contenders compute logits for every position, as a model called without a cache
does (Hugging Face `use_cache=False`, for example), although only the last one is used.

Decoding without a cache costs O(N^2) forward tokens, too slow to repeat on a CPU at long
lengths. The uncached contenders therefore also offer `profile`, the time of one step at a set
of sequence lengths (median of `runs` each). `project_total_seconds` sums those over the steps
of a generation.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.bench.scan_decode import generate_greedy_scanned, stack_layers
from jaxllm.config import ModelConfig
from jaxllm.convert import to_hf_state_dict
from jaxllm.generate import generate
from jaxllm.model import DecodeParams, forward, prepare_decode_params

CONTENDER_NAMES = (
    "jaxllm-cached",
    "jaxllm-cached-scan",
    "jaxllm-uncached",
    "torchref-cached",
    "torchref-uncached",
)
# Smallest bucket width of the uncached JAX contender, in tokens.
MIN_BUCKET_WIDTH = 32
# Buckets per doubling of the sequence length: a width of 1/8 of the enclosing power of two
# wastes at most 1/8 of a step on padding, for 8 compiles per doubling.
BUCKETS_PER_OCTAVE = 8
# Sequence lengths at which the uncached torchref contender is timed for a projection.
TORCH_PROFILE_POINTS = 9
# New tokens of the untimed warm-up generation of the torchref contenders, which compile nothing.
WARM_UP_TOKENS = 8


def bucket_length(length: int) -> int:
    """Round a sequence length up to a multiple of max(32, next_power_of_two(length) / 8)."""
    width = max(MIN_BUCKET_WIDTH, (1 << max(length - 1, 0).bit_length()) // BUCKETS_PER_OCTAVE)
    return -(-length // width) * width


def _median(values) -> float:
    return float(np.median(np.asarray(values, np.float64)))


def _time_call(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@dataclasses.dataclass
class StepProfile:
    """Step times of an uncached contender: `seconds[i]` is the median at `lengths[i]`."""

    lengths: list[int]
    seconds: list[float]
    # "bucket": a step at length l costs the time of the smallest profiled length >= l.
    # "interpolate": linear interpolation between the profiled lengths.
    rule: str


def project_total_seconds(profile: StepProfile, prompt_len: int, new_tokens: int) -> float:
    """Sum the profiled step times over the sequence lengths T, T+1, ..., T+N-1 of a generation."""
    lengths = np.arange(prompt_len, prompt_len + new_tokens)
    known = np.asarray(profile.lengths)
    seconds = np.asarray(profile.seconds)
    if profile.rule == "bucket":
        index = np.searchsorted(known, lengths, side="left")
        return float(seconds[index].sum())
    return float(np.interp(lengths, known, seconds).sum())


# --- JAX ----------------------------------------------------------------------------------------


def jax_params_for(params, dtype: str):
    """Parameters stored in `dtype`: float32 as given, bfloat16 cast once (as torch's .to())."""
    if dtype == "float32":
        return params
    return jax.tree.map(lambda leaf: leaf.astype(dtype), params)


# `generate` under one more jit, so that it can be compiled ahead of time and its compile timed.
_generate_jit = jax.jit(
    generate, static_argnames=("config", "max_new_tokens", "compute_dtype", "cache_dtype")
)
_prepare_jit = jax.jit(prepare_decode_params, static_argnames=("config", "compute_dtype"))


class JaxCached:
    """`jaxllm.generate.generate`, greedy, compiled ahead of time.

    The weights are laid out for decoding once, outside the timed generations, as a caller that
    decodes repeatedly would do. `layout_s` is the time of that step, compile included.
    """

    name = "jaxllm-cached"
    framework = "jaxllm"
    cached = True
    layers = "unrolled"

    def __init__(self, config: ModelConfig, params, dtype: str):
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.layout_s = None
        self._decode_params = None
        self._compiled = None
        self._arguments = None

    def _lay_out(self):
        """Return the decoding weights, made (and timed as `layout_s`) on the first call."""
        if self._decode_params is None:
            start = time.perf_counter()
            self._decode_params = jax.block_until_ready(self._make_layout())
            self.layout_s = time.perf_counter() - start
        return self._decode_params

    def _make_layout(self) -> DecodeParams:
        return _prepare_jit(self.params, self.config, self.dtype)

    def prepare(self, prompts: np.ndarray, new_tokens: int) -> float:
        """Compile for prompts [B, T] and `new_tokens`; returns the compile time in seconds."""
        decode_params = self._lay_out()
        tokens = jnp.asarray(prompts, jnp.int32)
        mask = jnp.ones(prompts.shape, bool)
        # vocab_size is never emitted, so no row stops early.
        traced = dict(temperature=0.0, top_k=0, top_p=1.0, pad_id=0,
                      stop_ids=jnp.asarray([self.config.vocab_size], jnp.int32))
        arguments = (decode_params, tokens, mask, jax.random.key(0))
        start = time.perf_counter()
        self._compiled = _generate_jit.lower(
            *arguments, config=self.config, max_new_tokens=new_tokens,
            compute_dtype=self.dtype, **traced,
        ).compile()
        seconds = time.perf_counter() - start
        self._arguments = (arguments, traced)
        return seconds

    def generate(self) -> np.ndarray:
        arguments, traced = self._arguments
        return np.asarray(self._compiled(*arguments, **traced).tokens)

    def warm_up(self) -> None:
        """Run the compiled program once, untimed."""
        self.generate()


class JaxCachedScan(JaxCached):
    """Greedy decoding with the layers under `lax.scan` (see `scan_decode`)."""

    name = "jaxllm-cached-scan"
    layers = "scan"

    def _make_layout(self) -> tuple[DecodeParams, dict]:
        decode_params = super()._make_layout()
        return decode_params, jax.jit(stack_layers)(decode_params)

    def prepare(self, prompts: np.ndarray, new_tokens: int) -> float:
        decode_params, stacked = self._lay_out()
        tokens = jnp.asarray(prompts, jnp.int32)
        start = time.perf_counter()
        self._compiled = generate_greedy_scanned.lower(
            decode_params, stacked, tokens, config=self.config, max_new_tokens=new_tokens,
            compute_dtype=self.dtype,
        ).compile()
        seconds = time.perf_counter() - start
        self._arguments = (decode_params, stacked, tokens)
        return seconds

    def generate(self) -> np.ndarray:
        return np.asarray(self._compiled(*self._arguments))


class JaxUncached:
    """A full forward per new token over the right-padded sequence, one compile per bucket."""

    name = "jaxllm-uncached"
    framework = "jaxllm"
    cached = False
    layers = "scan"

    def __init__(self, config: ModelConfig, params, dtype: str):
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self._steps: dict[int, Any] = {}

    def _step_function(self):
        config, dtype = self.config, self.dtype

        def step(params, tokens, last_index):
            """Greedy next token [B] after tokens [B, bucket] whose last real one is at last_index."""
            B, length = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (B, length))
            logits, _ = forward(params, tokens, positions, config=config, compute_dtype=dtype)
            last = jax.lax.dynamic_index_in_dim(logits, last_index, axis=1, keepdims=False)
            return jnp.argmax(last, axis=-1).astype(jnp.int32)

        return jax.jit(step)

    def prepare(self, prompts: np.ndarray, new_tokens: int) -> float:
        """Compile one step per bucket that the generation visits; returns the total seconds."""
        self._prompts = np.asarray(prompts, np.int32)
        self._new_tokens = new_tokens
        B, T = prompts.shape
        step = self._step_function()
        buckets = sorted({bucket_length(length) for length in range(T, T + new_tokens)})
        seconds = 0.0
        for bucket in buckets:
            tokens = jax.ShapeDtypeStruct((B, bucket), jnp.int32)
            index = jax.ShapeDtypeStruct((), jnp.int32)
            start = time.perf_counter()
            self._steps[bucket] = step.lower(self.params, tokens, index).compile()
            seconds += time.perf_counter() - start
        return seconds

    def generate(self) -> np.ndarray:
        B, T = self._prompts.shape
        N = self._new_tokens
        sequence = np.zeros((B, bucket_length(T + N - 1)), np.int32)
        sequence[:, :T] = self._prompts
        for step in range(N):
            length = T + step
            bucket = bucket_length(length)
            next_token = self._steps[bucket](self.params, jnp.asarray(sequence[:, :bucket]),
                                             jnp.asarray(length - 1, jnp.int32))
            sequence[:, length] = np.asarray(next_token)
        return sequence[:, T:T + N].copy()

    def profile(self, runs: int) -> StepProfile:
        """Median step time per bucket, after one warm-up call each."""
        B, T = self._prompts.shape
        lengths, seconds = [], []
        for bucket, compiled in sorted(self._steps.items()):
            tokens = jnp.asarray(np.resize(self._prompts, (B, bucket)))
            index = jnp.asarray(bucket - 1, jnp.int32)

            def call():
                compiled(self.params, tokens, index).block_until_ready()

            call()
            lengths.append(bucket)
            seconds.append(_median([_time_call(call) for _ in range(runs)]))
        return StepProfile(lengths=lengths, seconds=seconds, rule="bucket")


# --- torchref -----------------------------------------------------------------------------------


def torch_model_for(config: ModelConfig, params, dtype: str):
    """Build a torchref `Llama` with exactly the JAX weights (float32 values), cast to `dtype`."""
    import torch

    import torchref

    model_config = torchref.LlamaConfig.from_dict(dataclasses.asdict(config))
    model = torchref.Llama(model_config, seed=None).eval()
    state = {name: torch.from_numpy(np.array(array, np.float32))
             for name, array in to_hf_state_dict(params, config).items()}
    model.load_state_dict(state, strict=True)
    return model.to(getattr(torch, dtype))


class TorchCached:
    """`torchref.greedy_generate`: eager PyTorch with a preallocated KV cache."""

    name = "torchref-cached"
    framework = "torchref"
    cached = True
    layers = "unrolled"

    def __init__(self, model):
        self.model = model

    def prepare(self, prompts: np.ndarray, new_tokens: int) -> None:
        """Eager PyTorch compiles nothing; returns None."""
        import torch

        self._tokens = torch.from_numpy(np.asarray(prompts, np.int64))
        self._mask = torch.ones(self._tokens.shape, dtype=torch.bool)
        self._new_tokens = new_tokens
        return None

    def generate(self) -> np.ndarray:
        import torchref

        return torchref.greedy_generate(self.model, self._tokens, self._mask,
                                        self._new_tokens).numpy()

    def warm_up(self) -> None:
        """Run a short untimed generation, which starts torch's thread pool and allocator."""
        import torchref

        torchref.greedy_generate(self.model, self._tokens, self._mask,
                                 min(self._new_tokens, WARM_UP_TOKENS))


class TorchUncached(TorchCached):
    """Eager PyTorch, a full forward over the growing sequence per new token."""

    name = "torchref-uncached"
    cached = False

    def generate(self) -> np.ndarray:
        import torch

        tokens = self._tokens
        with torch.inference_mode():
            for _ in range(self._new_tokens):
                logits, _ = self.model(tokens)
                next_token = logits[:, -1].argmax(dim=-1)
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        return tokens[:, -self._new_tokens:].numpy()

    def profile(self, runs: int) -> StepProfile:
        """Median forward time at TORCH_PROFILE_POINTS evenly spaced sequence lengths."""
        import torch

        B, T = self._tokens.shape
        last = T + self._new_tokens - 1
        points = min(TORCH_PROFILE_POINTS, self._new_tokens)
        lengths = sorted({int(round(value)) for value in np.linspace(T, last, points)})
        seconds = []
        with torch.inference_mode():
            for length in lengths:
                tokens = self._tokens.repeat(1, -(-length // T))[:, :length]

                def call():
                    self.model(tokens)

                call()
                seconds.append(_median([_time_call(call) for _ in range(runs)]))
        return StepProfile(lengths=lengths, seconds=seconds, rule="interpolate")


def make_contender(name: str, config: ModelConfig, dtype: str, jax_params, torch_model):
    """Build the contender called `name` (one of CONTENDER_NAMES) for `dtype` compute.

    `jax_params` and `torch_model` hold the same weights, already stored in `dtype`.
    """
    if name == "jaxllm-cached":
        return JaxCached(config, jax_params, dtype)
    if name == "jaxllm-cached-scan":
        return JaxCachedScan(config, jax_params, dtype)
    if name == "jaxllm-uncached":
        return JaxUncached(config, jax_params, dtype)
    if name == "torchref-cached":
        return TorchCached(torch_model)
    if name == "torchref-uncached":
        return TorchUncached(torch_model)
    raise ValueError(f"unknown contender {name!r}; use one of {', '.join(CONTENDER_NAMES)}")
