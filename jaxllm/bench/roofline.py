"""Ceilings measured in the benchmark's own process: memory bandwidth and matmul FLOP/s.

Bandwidth is measured four ways on a large float32 array: XLA and numpy each sum it (reads
only) and copy it (one read and one write per byte, counted as two bytes moved). The XLA copy
adds 1.0 in place through a donated buffer, so that it does not time fresh page faults. The
decode roofline uses the faster of the two sums, because decoding reads weights and cache and
writes almost nothing, and a ceiling should be the best that this machine has shown.

The XLA sum is taken over several freshly allocated arrays. On the 2-core development machine
(Linux with transparent huge pages in `madvise` mode) the same sum streamed anywhere from 32 to
47 GB/s depending on the allocation, so a single array could set the ceiling a third too low.

The matmul ceiling is the float32 FLOP/s of one large square XLA matmul (2 n^3 FLOPs).

Every ceiling is the best of its runs, the usual convention for a ceiling, while the decode
and training speeds are medians.

Decode bytes: a step that produces one token per row reads every weight once and, per row,
the keys and values of the tokens in the cache. `decode_read_bytes` counts that minimum.
Both the jaxllm and the torchref cache attend over their whole preallocated buffer (masked), so
they read more than this minimum at early steps.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig

BYTES_PER_GB = 1e9


def _best_time(function, runs: int) -> float:
    """Run `function` once to warm up, then `runs` times; returns the fastest time in seconds."""
    function()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_bandwidth(num_bytes: int, runs: int, arrays: int = 3) -> dict:
    """Stream a float32 array of `num_bytes` through XLA and numpy; returns GB/s (1e9 bytes/s).

    The XLA sum is the best over `arrays` fresh allocations. `roofline_gb_per_s` is the faster
    sum, the figure that the decode rooflines use.
    """
    count = num_bytes // 4
    host = np.ones(count, np.float32)
    host_copy = np.empty_like(host)
    host_copy.fill(0.0)  # touch every page so that page faults are not timed
    device = jnp.asarray(host)

    xla_sum = jax.jit(jnp.sum)
    xla_add_in_place = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    state = {"copy": jnp.asarray(host)}

    def xla_sum_seconds():
        nonlocal device
        best = float("inf")
        for index in range(arrays):
            if index:
                device = jnp.asarray(host)  # a fresh allocation replaces the previous array
            best = min(best, _best_time(lambda: xla_sum(device).block_until_ready(), runs))
        return best

    def run_xla_copy():
        state["copy"] = xla_add_in_place(state["copy"])
        state["copy"].block_until_ready()

    def run_numpy_sum():
        host.sum()

    def run_numpy_copy():
        np.copyto(host_copy, host)

    nbytes = host.nbytes
    result = {
        "array_bytes": nbytes,
        "xla_sum_gb_per_s": nbytes / xla_sum_seconds() / BYTES_PER_GB,
        "xla_copy_gb_per_s": 2 * nbytes / _best_time(run_xla_copy, runs) / BYTES_PER_GB,
        "numpy_sum_gb_per_s": nbytes / _best_time(run_numpy_sum, runs) / BYTES_PER_GB,
        "numpy_copy_gb_per_s": 2 * nbytes / _best_time(run_numpy_copy, runs) / BYTES_PER_GB,
        "runs": runs,
        "xla_sum_arrays": arrays,
    }
    result["roofline_gb_per_s"] = max(result["xla_sum_gb_per_s"], result["numpy_sum_gb_per_s"])
    return result


def measure_matmul_flops(size: int, runs: int, dtype=jnp.float32) -> dict:
    """Time an XLA matmul of two [size, size] arrays; returns the best FLOP/s of `runs`."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((size, size)), dtype)
    b = jnp.asarray(rng.standard_normal((size, size)), dtype)
    matmul = jax.jit(jnp.matmul)

    def run():
        matmul(a, b).block_until_ready()

    seconds = _best_time(run, runs)
    return {
        "size": size,
        "dtype": jnp.dtype(dtype).name,
        "flop_per_s": 2 * size**3 / seconds,
        "runs": runs,
    }


def cache_bytes_per_token(config: ModelConfig, itemsize: int) -> int:
    """Bytes of keys plus values that one cached token occupies across all layers."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


def decode_read_bytes(
    *,
    weight_bytes: int,
    config: ModelConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    cache_itemsize: int,
    cached: bool,
) -> int:
    """Minimum bytes read to generate `new_tokens` tokens for `batch` rows.

    Step j (j = 0 is the prefill) reads the weights once for the whole batch and, with a cache,
    the prompt_len + j cached tokens of each row. Without a cache only the weights count here;
    that decoding is bound by compute, not by these bytes.
    """
    total = new_tokens * weight_bytes
    if cached:
        per_token = cache_bytes_per_token(config, cache_itemsize)
        cached_tokens = sum(prompt_len + step for step in range(new_tokens))
        total += batch * cached_tokens * per_token
    return total
