"""Thread settings, machine description and CPU interference readings for the benchmarks.

`configure_threads` must run before JAX creates its CPU client and before torch starts its
thread pool, so this module imports neither at module level. XLA:CPU (jaxlib 0.10.2) sizes its
Eigen intra-op thread pool from the process's CPU affinity mask, so restricting the mask is how
the benchmark gives XLA the same number of threads as `torch.set_num_threads`. `thread_report`
counts the pool's threads (named `tf_XLAEigen`) instead of trusting that.

Interference: other processes on a shared machine slow a benchmark down. `CpuMeter` reads
/proc/stat and /proc/self/stat around a measurement and reports how many cores other processes
kept busy on average (`foreign_cpu_cores`), which is recorded next to every result.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from jaxllm.errors import UserInputError

# Name that XLA gives the threads of its CPU intra-op pool.
XLA_POOL_THREAD_NAME = "tf_XLAEigen"


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def configure_threads(num_threads: int) -> list[int]:
    """Pin the process to its first `num_threads` CPUs; returns the CPUs kept.

    Also sets torch's intra-op thread count when torch is installed. Call before any JAX
    computation, because XLA sizes its thread pool once, from the affinity mask.
    """
    cpus = available_cpus()
    if not 1 <= num_threads <= len(cpus):
        raise UserInputError(
            f"--threads must be between 1 and the {len(cpus)} CPUs this process may use, "
            f"got {num_threads}"
        )
    kept = cpus[:num_threads]
    os.sched_setaffinity(0, kept)
    try:
        import torch
    except ImportError:
        return kept
    torch.set_num_threads(num_threads)
    return kept


def thread_report() -> dict:
    """The thread settings in effect: affinity, XLA pool size (counted), torch threads, XLA_FLAGS.

    Runs a small JAX computation first so that the XLA pool exists when it is counted.
    """
    import jax.numpy as jnp

    (jnp.ones((64, 64)) @ jnp.ones((64, 64))).block_until_ready()
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            continue  # the thread exited between listing and reading
    report = {
        "cpu_affinity": available_cpus(),
        "xla_pool_threads": names.count(XLA_POOL_THREAD_NAME),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import torch
    except ImportError:
        return report
    report["torch_threads"] = torch.get_num_threads()
    report["torch_interop_threads"] = torch.get_num_interop_threads()
    return report


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages from /proc/loadavg."""
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def wait_for_load(max_load: float, timeout_s: float, poll_s: float = 30.0, log=None) -> list[float]:
    """Poll until the 1-minute load average is below `max_load` or `timeout_s` has passed.

    Returns the load averages read last. `log(message)` receives one line per poll.
    """
    deadline = time.monotonic() + timeout_s
    load = load_average()
    while load[0] >= max_load and time.monotonic() < deadline:
        if log is not None:
            log(f"1-minute load {load[0]:.2f} >= {max_load}; waiting {poll_s:.0f} s")
        time.sleep(poll_s)
        load = load_average()
    return load


def describe_machine() -> dict:
    """CPU model name, logical CPU count, memory and platform, read from /proc and os."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
            break
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def package_versions() -> dict:
    """Versions of the packages whose speed is measured."""
    from importlib import metadata

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _busy_jiffies() -> int:
    """Non-idle jiffies of all CPUs since boot; steal counts as busy (another guest ran)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    del idle, iowait
    return user + nice + system + irq + softirq + steal


def _own_jiffies() -> int:
    """User plus system jiffies of this process, all threads included."""
    text = Path("/proc/self/stat").read_text()
    # The command name may contain spaces, so split after its closing parenthesis.
    fields = text[text.rindex(")") + 2:].split()
    # utime and stime are fields 14 and 15 of proc(5), 12 and 13 after the name.
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """Measures the cores that other processes kept busy between `__init__` and `read`."""

    def __init__(self):
        self._hz = os.sysconf("SC_CLK_TCK")
        self._start = (time.monotonic(), _busy_jiffies(), _own_jiffies())

    def read(self) -> float:
        """Average number of CPUs busy with other processes (or stolen by the hypervisor)."""
        wall, busy, own = time.monotonic(), _busy_jiffies(), _own_jiffies()
        start_wall, start_busy, start_own = self._start
        elapsed = max(wall - start_wall, 1e-9)
        foreign = (busy - start_busy) - (own - start_own)
        return max(foreign, 0) / self._hz / elapsed
