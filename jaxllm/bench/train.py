"""The training benchmark: tokens/s and achieved FLOP/s of the project's train step.

The step is `jaxllm.train.step.make_train_step` (forward, backward, global-norm clipping and
AdamW, one jit with the state donated) on random token windows [B, T + 1].

FLOPs per trained token, counting matmuls only:

    6 * P_matmul + 12 * L * T * N * H

P_matmul = L * (D*N*H + 2*D*K*H + N*H*D + 3*D*F) + D*V is the number of weights that take part
in a matmul: the attention and MLP kernels and the LM head (the tied embedding counts once,
for the head; the embedding lookup is a gather). Each such weight costs 2 FLOPs per token
forward and 4 backward. Attention adds, per layer and token, 2*T*N*H FLOPs for the scores
q k^T and 2*T*N*H for the weighted sum of values, tripled for the backward pass. T is not
halved for causality because the model computes the whole masked T x T score matrix. Norms,
RoPE, softmax and the optimizer update are elementwise and not counted.

The ceiling is a large float32 XLA matmul measured in the same process (`roofline`);
utilisation = achieved FLOP/s / ceiling.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.bench import machine, roofline
from jaxllm.config import ModelConfig, load_config
from jaxllm.errors import UserInputError
from jaxllm.model import count_params
from jaxllm.train.state import create_train_state
from jaxllm.train.step import make_train_step

TRAIN_STEP_SOURCE = "jaxllm.train.step.make_train_step"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What the training benchmark measures."""

    config: str
    batch: int
    seq_len: int
    steps: int
    dtype: str
    matmul_size: int
    matmul_runs: int
    seed: int

    def __post_init__(self):
        for name in ("batch", "seq_len", "steps", "matmul_size", "matmul_runs"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be at least 1, got {getattr(self, name)}")


def matmul_params(config: ModelConfig) -> int:
    """P_matmul: weights that take part in a matmul (layer kernels and the LM head)."""
    D, F, V = config.embed_dim, config.mlp_dim, config.vocab_size
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    return config.num_layers * per_layer + D * V


def train_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """6 * P_matmul + 12 * L * T * N * H (see the module docstring)."""
    attention = 12 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return 6 * matmul_params(config) + attention


def run_train_benchmark(settings: TrainSettings, log: Callable[[str], None]) -> dict:
    """Time `settings.steps` train steps after one warm-up step; returns JSON-ready results."""
    config = load_config(settings.config, [f"train.compute_dtype={settings.dtype}"])
    model = config.model
    if settings.seq_len > model.max_seq_len:
        raise UserInputError(f"seq_len {settings.seq_len} exceeds model.max_seq_len "
                         f"({model.max_seq_len}) of {settings.config}")

    log(f"measuring the matmul ceiling ({settings.matmul_size}^2 float32)")
    ceiling = roofline.measure_matmul_flops(settings.matmul_size, settings.matmul_runs)

    load_at_start = machine.load_average()[0]
    meter = machine.CpuMeter()
    state = create_train_state(config, jax.random.key(settings.seed))
    num_params = count_params(state.params)
    rng = np.random.default_rng(settings.seed)
    shape = (settings.batch, settings.seq_len + 1)
    batches = [jnp.asarray(rng.integers(0, model.vocab_size, shape), jnp.int32)
               for _ in range(settings.steps + 1)]

    log("compiling the train step")
    step = make_train_step(config)
    start = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start

    log("running 1 warm-up step")
    state, metrics = compiled(state, batches[0])
    jax.block_until_ready(metrics)
    seconds, losses = [], []
    for index in range(settings.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batches[index + 1])
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
        losses.append(float(metrics["train/loss"]))
        log(f"step {index + 1}/{settings.steps}: {seconds[-1]:.2f} s")

    tokens_per_step = settings.batch * settings.seq_len
    tokens_per_s = tokens_per_step / float(np.median(seconds))
    flops_per_token = train_flops_per_token(model, settings.seq_len)
    achieved = flops_per_token * tokens_per_s
    return {
        "benchmark": "train",
        "settings": dataclasses.asdict(settings),
        "train_step": TRAIN_STEP_SOURCE,
        "model": dataclasses.asdict(model),
        "num_params": num_params,
        "matmul_params": matmul_params(model),
        "flops_per_token": flops_per_token,
        "flops_formula": "6 * P_matmul + 12 * L * T * N * H",
        "compile_s": compile_s,
        "step_seconds": seconds,
        "losses": losses,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "achieved_flop_per_s": achieved,
        "matmul_ceiling": ceiling,
        "utilisation": achieved / ceiling["flop_per_s"],
        "load_avg_1m_at_start": load_at_start,
        "foreign_cpu_cores": meter.read(),
    }
