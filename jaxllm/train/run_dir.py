"""The run directory: its file names, the config check before resuming, creation and reset."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from jaxllm.checkpoint import CHECKPOINT_DIR
from jaxllm.config import Config, read_config
from jaxllm.errors import UserInputError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
FIGURE_DIR = "figures"
LOSS_FIGURE = "loss.png"
# Everything a run writes; --overwrite deletes exactly these.
RUN_ENTRIES = (CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE, FIGURE_DIR, CHECKPOINT_DIR)
# Train fields that change the parameters a run ends with. The others (logging, evaluation,
# checkpoint cadence, the end-of-run sample) may differ between a run and its resumption.
TRAJECTORY_TRAIN_FIELDS = ("steps", "batch_size", "compute_dtype", "seed", "loss_scale")


class RunDirError(UserInputError):
    """A run directory that cannot be used for the requested run."""



def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _trajectory_fields(config: Config) -> dict[str, Any]:
    values = config.to_dict()
    relevant = {section: values[section] for section in ("model", "data", "optimizer")}
    relevant["train"] = {name: values["train"][name] for name in TRAJECTORY_TRAIN_FIELDS}
    return _flatten(relevant)


def first_config_difference(saved: Config, requested: Config) -> tuple[str, Any, Any] | None:
    """Return (key, saved value, requested value) of the first trajectory-relevant difference."""
    saved_fields = _trajectory_fields(saved)
    for key, value in _trajectory_fields(requested).items():
        if saved_fields.get(key) != value:
            return key, saved_fields.get(key), value
    return None


def check_run_dir(run_dir: Path, config: Config, *, overwrite: bool) -> bool:
    """Check that `run_dir` can hold this run, without writing; return True to resume.

    A directory with an earlier run must have a matching config.yaml (see
    TRAJECTORY_TRAIN_FIELDS), unless `overwrite` is set, in which case it starts over.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file; pick another --run-dir")
    existing = [name for name in RUN_ENTRIES if (run_dir / name).exists()]
    if not existing or overwrite:
        return False
    if CONFIG_FILE not in existing:
        raise RunDirError(
            f"run directory {run_dir} contains {', '.join(existing)} but no {CONFIG_FILE}; "
            "pass --overwrite to delete them or pick a new --run-dir"
        )
    saved = read_config(run_dir / CONFIG_FILE)
    difference = first_config_difference(saved, config)
    if difference is not None:
        key, old, new = difference
        raise RunDirError(
            f"run directory {run_dir} was created with {key}={old!r}, but this run has "
            f"{key}={new!r}; pass --overwrite to start over or pick a new --run-dir"
        )
    return True


def clear_run_dir(run_dir: Path) -> None:
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logger.info("deleted the earlier run in %s (--overwrite)", run_dir)


def create_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"cannot create run directory {run_dir} ({error.strerror}); "
                          "pick another --run-dir") from None
