"""Whole Hugging Face Llama folders, and their conversion to and from jaxllm run directories.

`load_hf_model` and `save_hf_model` read and write a folder's config.json (`hf_config`),
safetensors weights (`safetensors_io`) and tokenizer files (`hf_tokenizer`).
`import_hf_run` turns a `LlamaForCausalLM` folder into a jaxllm run directory (config.yaml,
tokenizer.json and an Orbax checkpoint at step 0). `export_run_to_hf` writes a run's checkpoint
as a folder that `transformers.LlamaForCausalLM.from_pretrained` loads. The tensor names and
layouts are mapped by `jaxllm.convert.layout`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxllm.checkpoint import CheckpointWriter, restore_params
from jaxllm.config import Config, DataConfig, ModelConfig, read_config, save_config
from jaxllm.convert.hf_config import (
    CONFIG_FILE,
    hf_config_from_model,
    model_config_from_hf,
    read_hf_config,
)
from jaxllm.convert.hf_tokenizer import tokenizer_from_hf, write_hf_tokenizer
from jaxllm.convert.layout import ConversionError, from_hf_state_dict, to_hf_state_dict
from jaxllm.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES, read_hf_weights, write_hf_weights
from jaxllm.data.tokenizer import TOKENIZER_FILE, Tokenizer
from jaxllm.precision import LossScale, uses_loss_scaling
from jaxllm.train.optim import make_optimizer
from jaxllm.train.state import TrainState

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.yaml"
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Checkpoint step of an imported model.
IMPORT_STEP = 0


def load_hf_model(hf_dir: str | Path) -> tuple[ModelConfig, dict]:
    """Read a `LlamaForCausalLM` folder; returns its ModelConfig and float32 jaxllm params.

    Raises ConversionError naming the tensor when one is missing, unexpected (a bias, say)
    or has the wrong shape.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"Hugging Face model folder {hf_dir} not found")
    config = model_config_from_hf(read_hf_config(hf_dir))
    state = read_hf_weights(hf_dir)
    # Old checkpoints store the rotary inverse frequencies as a buffer; they follow from config.
    state = {
        name: tensor for name, tensor in state.items() if not name.endswith("rotary_emb.inv_freq")
    }
    return config, from_hf_state_dict(state, config, dtype=np.float32)


def save_hf_model(
    params,
    config: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: Tokenizer | None = None,
) -> list[Path]:
    """Write config.json, safetensors weights in `dtype` and, if given, the tokenizer files.

    Returns the files written. Raises ConversionError for an unknown dtype, or when
    embed_dim is not a multiple of num_heads, which transformers 5.25 rejects on load.
    """
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(
            f"unknown export dtype {dtype!r}; use one of {', '.join(EXPORT_DTYPES)}"
        )
    if config.embed_dim % config.num_heads:
        raise ConversionError(
            f"model.embed_dim {config.embed_dim} is not a multiple of model.num_heads "
            f"{config.num_heads}, so transformers 5.25 would not load the exported config"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.astype(EXPORT_DTYPES[dtype])
        for name, tensor in to_hf_state_dict(params, config).items()
    }
    written = write_hf_weights(state, out_dir, max_shard_bytes=max_shard_bytes)

    token_ids = {}
    if tokenizer is not None:
        token_ids = {
            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id
        }
        written.extend(write_hf_tokenizer(tokenizer, out_dir, max_seq_len=config.max_seq_len))
    config_path = out_dir / CONFIG_FILE
    hf_config = hf_config_from_model(config, dtype=dtype, **token_ids)
    config_path.write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return [config_path, *written]


def _check_output_dir(target: Path, *, overwrite: bool, inputs: tuple[Path, ...]) -> None:
    """Raise ConversionError unless conversion may write `target`.

    `target` must be missing, an empty folder, or (with `overwrite`) a folder that contains
    none of `inputs`.
    """
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise ConversionError(f"output {target} exists and is not a directory")
    if not (target.is_dir() and any(target.iterdir())):
        return
    if not overwrite:
        raise ConversionError(
            f"output directory {target} exists and is not empty; choose another directory "
            "or pass --overwrite to replace it"
        )
    for source in inputs:
        source = source.resolve()
        if source == target.resolve() or target.resolve() in source.parents:
            raise ConversionError(f"output directory {target} contains the input {source}; "
                                  "choose another output directory")


@contextlib.contextmanager
def _replacing_dir(target: Path, *, overwrite: bool, inputs: tuple[Path, ...]) -> Iterator[Path]:
    """Yield an empty staging folder that replaces `target` when the block succeeds.

    A failed conversion leaves `target` as it was. Raises ConversionError as
    `_check_output_dir` does.
    """
    _check_output_dir(target, overwrite=overwrite, inputs=inputs)
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.is_dir():
        shutil.rmtree(target)
    staging.rename(target)


def _initial_train_state(config: Config, params) -> TrainState:
    """Build a step-0 train state around imported params, so that the run can also be trained."""
    params = jax.tree.map(jnp.asarray, params)
    loss_scale = None
    if uses_loss_scaling(config.train.compute_dtype):
        loss_scale = LossScale.create(config.train.loss_scale)
    return TrainState(
        params=params,
        opt_state=make_optimizer(config.optimizer, learning_rate=0.0).init(params),
        step=jnp.asarray(IMPORT_STEP, jnp.int32),
        rng=jax.random.key(config.train.seed),
        loss_scale=loss_scale,
    )


def import_hf_run(hf_dir: str | Path, run_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a `LlamaForCausalLM` folder into a jaxllm run directory and return its path.

    The run directory gets config.yaml (the model section from config.json, defaults
    elsewhere, data.seq_len capped at model.max_seq_len), tokenizer.json (see
    `tokenizer_from_hf`) and a checkpoint at step 0 with the float32 parameters.
    """
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    # Checked before the weights are read, and again before anything is replaced.
    _check_output_dir(run_dir, overwrite=overwrite, inputs=(hf_dir,))
    model_config, params = load_hf_model(hf_dir)
    tokenizer = tokenizer_from_hf(hf_dir, model_config.vocab_size)
    seq_len = min(DataConfig().seq_len, model_config.max_seq_len)
    config = Config(model=model_config, data=DataConfig(seq_len=seq_len))

    with _replacing_dir(run_dir, overwrite=overwrite, inputs=(hf_dir,)) as staging:
        save_config(config, staging / RUN_CONFIG_FILE)
        tokenizer.save(staging / TOKENIZER_FILE)
        # NOTE: the step-0 optimizer state (zeros) triples the checkpoint's size on disk, because
        # jaxllm.checkpoint saves whole train states only. Sampling reads the params alone.
        with CheckpointWriter(staging, keep=config.train.keep_checkpoints) as writer:
            position = {"step": IMPORT_STEP, "windows_consumed": 0}
            writer.save(_initial_train_state(config, params), position)
    logger.info("imported %s into %s", hf_dir, run_dir)
    return run_dir


def export_run_to_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> list[Path]:
    """Write the checkpoint `step` (default: the latest) of a run as a Hugging Face folder.

    Returns the files written, under `out_dir`.
    """
    # Orbax reads absolute paths only.
    run_dir = Path(run_dir).absolute()
    config_path = run_dir / RUN_CONFIG_FILE
    if not config_path.is_file():
        raise ConversionError(f"{config_path} not found; pass a jaxllm run directory")
    out_dir = Path(out_dir)
    _check_output_dir(out_dir, overwrite=overwrite, inputs=(run_dir,))
    config = read_config(config_path)
    tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE)
    params = restore_params(run_dir, config.model, step)

    with _replacing_dir(out_dir, overwrite=overwrite, inputs=(run_dir,)) as staging:
        written = save_hf_model(
            params, config.model, staging, dtype=dtype, max_shard_bytes=max_shard_bytes,
            tokenizer=tokenizer,
        )
    logger.info("exported %s to %s", run_dir, out_dir)
    return [out_dir.absolute() / path.name for path in written]
