"""A pretraining run: run directory, data, the training loop, evaluation, checkpoints, figure.

A run directory contains `config.yaml` (the resolved config), `tokenizer.json`, `checkpoints/`,
`metrics.jsonl` and `figures/loss.png`. Rerunning with the same directory resumes from the
latest checkpoint. The batches are a pure function of the step and step s draws its
randomness from `fold_in(rng, s)`, so on CPU a resumed run ends with the same parameters,
bit for bit, as an uninterrupted one. Rows of `metrics.jsonl` after the restored step are
dropped on resume, so the file never contains two rows for one step and kind.

The library does not print. An entry point passes `ProgressHooks` to show progress and
prints the returned `RunResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    CheckpointWriter,
    latest_step,
    restore_train_state,
)
from jaxllm.config import Config, ConfigError, save_config
from jaxllm.data import (
    BatchSampler,
    PreparedData,
    Tokenizer,
    prepare_data,
    validation_batches,
)
from jaxllm.errors import UserInputError
from jaxllm.generate import default_decode_dtype, generate_text
from jaxllm.metrics import MetricsLog, plot_losses
from jaxllm.model import count_params
from jaxllm.train.optim import make_schedule
from jaxllm.train.run_dir import (
    CONFIG_FILE,
    FIGURE_DIR,
    LOSS_FIGURE,
    METRICS_FILE,
    TOKENIZER_FILE,
    check_run_dir,
    clear_run_dir,
    create_run_dir,
)
from jaxllm.train.state import TrainState, abstract_train_state, create_train_state
from jaxllm.train.step import make_eval_step, make_train_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Plan and sizes of a starting run, passed to `ProgressHooks.on_start`."""

    run_dir: Path
    # Step restored from a checkpoint, or None for a fresh start.
    resumed_from: int | None
    start_step: int
    # The step the run stops after: train.steps, or --stop-at when that is smaller.
    end_step: int
    total_steps: int
    tokens_per_step: int
    num_params: int
    num_train_windows: int
    num_val_windows: int
    unigram_entropy: float


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Outcome of `pretrain`. Losses are mean cross-entropies in nats per token."""

    run_dir: Path
    step: int
    # True when the run ended before train.steps (--stop-at) and can be resumed.
    stopped_early: bool
    first_train_loss: float | None
    final_train_loss: float | None
    # Validation loss at `step`; None when the run stopped early before an evaluation.
    val_loss: float | None
    unigram_entropy: float
    # Mean training throughput of this process, without the first step's compilation.
    tokens_per_s: float | None
    wall_time_s: float
    sample: str | None
    figure: Path | None


class ProgressHooks:
    """Callbacks through which an entry point shows progress; the defaults do nothing."""

    def on_start(self, info: RunInfo) -> None:
        pass

    def on_step(self, step: int, row: dict[str, Any] | None) -> None:
        """Called after every step, with the metrics row when one was logged."""

    def on_eval(self, step: int, val_loss: float) -> None:
        pass

    def on_end(self) -> None:
        pass


# --- evaluation, sample, figure -----------------------------------------------------------


def evaluate(eval_step, params, batches: Iterable[np.ndarray]) -> float:
    """Token-weighted mean cross-entropy (nats per token) over `batches`."""
    total_nll = 0.0
    total_tokens = 0
    for batch in batches:
        metrics = eval_step(params, jnp.asarray(batch))
        tokens = int(metrics["loss/tokens"])
        total_nll += float(metrics["loss/ce"]) * tokens
        total_tokens += tokens
    return total_nll / max(total_tokens, 1)


def _check_sample_prompt(config: Config, tokenizer: Tokenizer) -> None:
    if config.train.sample_tokens == 0:
        return
    needed = len(tokenizer.encode(config.train.sample_prompt, add_bos=True)) + config.train.sample_tokens
    if needed > config.model.max_seq_len:
        raise ConfigError(
            f"train.sample_prompt and train.sample_tokens need {needed} positions, more than "
            f"model.max_seq_len ({config.model.max_seq_len}); shorten the prompt or lower "
            "train.sample_tokens"
        )


def _sample(config: Config, params, tokenizer: Tokenizer) -> str | None:
    if config.train.sample_tokens == 0:
        return None
    decode = config.decode
    [completion] = generate_text(
        params,
        tokenizer,
        [config.train.sample_prompt],
        config=config.model,
        max_new_tokens=config.train.sample_tokens,
        temperature=decode.temperature,
        top_k=decode.top_k,
        top_p=decode.top_p,
        seed=decode.seed,
        compute_dtype=default_decode_dtype(),
    )
    return config.train.sample_prompt + completion


# --- the run ------------------------------------------------------------------------------


def _prepare_data(config: Config, run_dir: Path, resume: bool) -> PreparedData:
    saved_tokenizer = run_dir / TOKENIZER_FILE
    if resume and saved_tokenizer.exists():
        return prepare_data(config.data, config.model.vocab_size, tokenizer_path=saved_tokenizer)
    return prepare_data(config.data, config.model.vocab_size)


def _restore_or_create(config: Config, run_dir: Path, metrics: MetricsLog) -> tuple[TrainState, int | None]:
    step = latest_step(run_dir)
    if step is None:
        metrics.truncate_after(0)
        return create_train_state(config, jax.random.key(config.train.seed)), None
    state, position = restore_train_state(run_dir, abstract_train_state(config), step)
    expected = step * config.train.batch_size
    if position.get("windows_consumed") != expected:
        raise CheckpointError(
            f"checkpoint step {step} in {run_dir / CHECKPOINT_DIR} records "
            f"{position.get('windows_consumed')} windows consumed, but {step} steps of "
            f"train.batch_size {config.train.batch_size} are {expected}"
        )
    metrics.truncate_after(step)
    return state, step


def pretrain(
    config: Config,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    stop_at: int | None = None,
    hooks: ProgressHooks | None = None,
) -> RunResult:
    """Train `config` into `run_dir`, resuming from its latest checkpoint if there is one.

    `stop_at` ends the run after that step with a checkpoint, as an interruption would.
    Raises UserInputError (or DataError) for unusable input before anything is written.
    """
    started = time.perf_counter()
    hooks = hooks or ProgressHooks()
    run_dir = Path(run_dir)
    if stop_at is not None and stop_at < 1:
        raise UserInputError(f"--stop-at must be a positive step, got {stop_at}")

    # 1. Validate everything before writing, so a bad input leaves the run directory as it was.
    make_schedule(config)
    resume = check_run_dir(run_dir, config, overwrite=overwrite)
    data = _prepare_data(config, run_dir, resume)
    _check_sample_prompt(config, data.tokenizer)

    # 2. Write the resolved config and the tokenizer (both are kept when resuming).
    if overwrite:
        clear_run_dir(run_dir)
    create_run_dir(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        save_config(config, run_dir / CONFIG_FILE)
    if not (run_dir / TOKENIZER_FILE).exists():
        data.tokenizer.save(run_dir / TOKENIZER_FILE)

    # 3. Restore or initialise the train state; drop metrics rows past the restored step.
    metrics = MetricsLog(run_dir / METRICS_FILE)
    state, resumed_from = _restore_or_create(config, run_dir, metrics)
    train = config.train
    tokens_per_step = train.batch_size * config.data.seq_len
    end_step = train.steps if stop_at is None else min(stop_at, train.steps)
    info = RunInfo(
        run_dir=run_dir,
        resumed_from=resumed_from,
        start_step=int(state.step),
        end_step=end_step,
        total_steps=train.steps,
        tokens_per_step=tokens_per_step,
        num_params=count_params(state.params),
        num_train_windows=int(data.train_windows.shape[0]),
        num_val_windows=int(data.val_windows.shape[0]),
        unigram_entropy=data.train_unigram_entropy,
    )
    logger.info(
        "model: %s parameters; data: %d train and %d validation windows, %d tokens per step; "
        "unigram entropy %.3f nats/token",
        f"{info.num_params:,}", info.num_train_windows, info.num_val_windows, tokens_per_step,
        info.unigram_entropy,
    )
    hooks.on_start(info)

    # 4. Train.
    sampler = BatchSampler(data.train_windows, train.batch_size, seed=train.seed)
    val_batches = validation_batches(data.val_windows, train.batch_size, train.eval_batches)
    train_step = make_train_step(config)
    eval_step = make_eval_step(config)
    step = int(state.step)
    timing = _Throughput(tokens_per_step)
    try:
        with CheckpointWriter(run_dir, train.keep_checkpoints) as writer:
            while step < end_step:
                state, step_metrics = train_step(state, jnp.asarray(sampler.batch(step)))
                step += 1
                timing.step_done(step_metrics)

                row = None
                if step == 1 or step % train.log_every == 0 or step == train.steps:
                    row = {"step": step, **{key: float(value) for key, value in step_metrics.items()}}
                    row.update(timing.take())
                    metrics.append(row)
                hooks.on_step(step, row)

                if step % train.eval_every == 0 or step == train.steps:
                    val_loss = evaluate(eval_step, state.params, val_batches)
                    metrics.append({"step": step, "val/loss": val_loss,
                                    "val/unigram_entropy": data.train_unigram_entropy})
                    hooks.on_eval(step, val_loss)
                    timing.pause()
                if step % train.checkpoint_every == 0 or step == end_step:
                    writer.save(state, {"step": step, "windows_consumed": step * train.batch_size})
                    timing.pause()
    finally:
        metrics.close()
        hooks.on_end()

    # 5. Report: losses from metrics.jsonl (it spans resumptions), sample and figure at the end.
    rows = metrics.rows()
    train_losses = [row["train/loss"] for row in rows if row.get("train/loss") is not None]
    val_rows = [row for row in rows if row["step"] == step and "val/loss" in row]
    finished = step >= train.steps
    val_loss = val_rows[-1]["val/loss"] if val_rows else None
    if finished and val_loss is None:
        # A finished run restored from its last checkpoint whose evaluation row was lost.
        val_loss = evaluate(eval_step, state.params, val_batches)
        metrics.append({"step": step, "val/loss": val_loss,
                        "val/unigram_entropy": data.train_unigram_entropy})
        metrics.close()
        rows = metrics.rows()
    sample = _sample(config, state.params, data.tokenizer) if finished else None
    figure = None
    if finished:
        figure = plot_losses(rows, data.train_unigram_entropy, run_dir / FIGURE_DIR / LOSS_FIGURE)
    return RunResult(
        run_dir=run_dir,
        step=step,
        stopped_early=not finished,
        first_train_loss=train_losses[0] if train_losses else None,
        final_train_loss=train_losses[-1] if train_losses else None,
        val_loss=val_loss,
        unigram_entropy=data.train_unigram_entropy,
        tokens_per_s=timing.mean(),
        wall_time_s=time.perf_counter() - started,
        sample=sample,
        figure=figure,
    )


class _Throughput:
    """Tokens per second of training steps, excluding the first step (compilation) and the
    time spent in evaluation and checkpoints."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._interval_start: float | None = None
        self._interval_steps = 0
        self._total_time = 0.0
        self._total_steps = 0

    def step_done(self, step_metrics) -> None:
        if self._interval_start is None:
            # The first step of a process includes compilation; time from its end.
            jax.block_until_ready(step_metrics)
            self._interval_start = time.perf_counter()
        else:
            self._interval_steps += 1

    def take(self) -> dict[str, float]:
        """Close the interval and return its `train/tokens_per_s`, or nothing when it has no
        timed step. Callers have synchronised with the device by reading the step's metrics."""
        if self._interval_start is None or self._interval_steps == 0:
            return {}
        elapsed = time.perf_counter() - self._interval_start
        self._total_time += elapsed
        self._total_steps += self._interval_steps
        rate = self._interval_steps * self.tokens_per_step / elapsed
        self._interval_start = time.perf_counter()
        self._interval_steps = 0
        return {"train/tokens_per_s": rate}

    def pause(self) -> None:
        """Drop the current interval's time after evaluation or a checkpoint."""
        if self._interval_start is not None:
            self._interval_start = time.perf_counter()
            self._interval_steps = 0

    def mean(self) -> float | None:
        if self._total_steps == 0:
            return None
        return self._total_steps * self.tokens_per_step / self._total_time
