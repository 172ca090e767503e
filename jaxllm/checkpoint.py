"""Checkpoints of a run directory: Orbax steps under `RUN_DIR/checkpoints/<step>/`.

Each step contains three Orbax items:
- `params`: the float32 parameter pytree, alone, so sampling restores it without building an
  optimizer state;
- `train_state`: optimizer state, step, the base key as raw key data (uint32) and, for
  float16 compute, the loss-scale state;
- `data_position`: JSON with the data position. The batch sampler is a pure function of the
  step, so the step alone positions it; the number of windows consumed is stored beside it.

Saves are synchronous. A step is written to a temporary folder that Orbax renames into place
when it is complete, so a process killed during a save leaves the previous steps intact. The
next `CheckpointWriter` removes the leftover temporary folder before its first save.

After the rename, `file_sizes.json` in the step folder records the size of every file. A
restore first compares the files of the items it reads with that record, then the stored tree
paths, shapes and dtypes with the target, and raises `CheckpointError` naming the step and the
first difference. The size check exists because Orbax 0.12.8 reports a truncated or deleted
array file only after its concurrent reads have started, and the reads still in flight then
print "Event loop is closed" tracebacks to stderr. The check does not detect a changed byte
in a file of the right size. Orbax reports such a file only when it cannot decode it, and its
error then becomes a CheckpointError.
NOTE: Orbax's reads still in flight may print tracebacks to stderr before that error, and a
changed byte that still decodes (inside raw array data) restores silently: nothing is hashed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxllm.config import ModelConfig
from jaxllm.errors import UserInputError
from jaxllm.model import param_shapes

if TYPE_CHECKING:
    from jaxllm.train.state import TrainState

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_PARAMS = "params"
_TRAIN_STATE = "train_state"
_DATA_POSITION = "data_position"
_ITEM_NAMES = (_PARAMS, _TRAIN_STATE, _DATA_POSITION)
_FILE_SIZES = "file_sizes.json"

# Errors that Orbax and tensorstore raise for missing, truncated or garbled checkpoint files
# (checked with orbax-checkpoint 0.12.8): tensorstore and JSON decoding raise ValueError,
# a deleted file raises FileNotFoundError (an OSError), and a deleted item folder KeyError.
_READ_ERRORS = (ValueError, OSError, KeyError)


class CheckpointError(UserInputError):
    """A checkpoint that is missing, corrupt or does not match the model or train state."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    # Absolute, because Orbax 0.12.8 rejects a relative checkpoint path when it saves.
    return Path(run_dir).absolute() / CHECKPOINT_DIR


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        _PARAMS: ocp.StandardCheckpointHandler(),
        _TRAIN_STATE: ocp.StandardCheckpointHandler(),
        _DATA_POSITION: ocp.JsonCheckpointHandler(),
    }


def _manager(directory: Path, *, keep: int | None = None, writable: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=writable,
        cleanup_tmp_directories=writable,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        directory, item_names=_ITEM_NAMES, item_handlers=_item_handlers(), options=options
    )


def _train_tree(state: TrainState) -> dict[str, Any]:
    """Build the `train_state` item: everything but the parameters, with the key as raw data."""
    if isinstance(state.rng, jax.ShapeDtypeStruct):
        rng_data = jax.eval_shape(jax.random.key_data, state.rng)
    else:
        rng_data = jax.random.key_data(state.rng)
    tree = {"opt_state": state.opt_state, "step": state.step, "rng": rng_data}
    if state.loss_scale is not None:
        tree["loss_scale"] = {"scale": state.loss_scale.scale,
                              "good_steps": state.loss_scale.good_steps}
    return tree


class CheckpointWriter:
    """Saves train states into `RUN_DIR/checkpoints`, keeping the newest `keep` steps."""

    def __init__(self, run_dir: str | Path, keep: int):
        self.directory = checkpoint_dir(run_dir)
        self._manager = _manager(self.directory, keep=keep, writable=True)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, data_position: Mapping[str, Any]) -> bool:
        """Write `state` at its step and wait until it is on disk.

        Returns False without writing when that step already exists.
        """
        step = int(state.step)
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{
                _PARAMS: ocp.args.StandardSave(state.params),
                _TRAIN_STATE: ocp.args.StandardSave(_train_tree(state)),
                _DATA_POSITION: ocp.args.JsonSave(dict(data_position)),
            }
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        _write_file_sizes(self.directory / str(step))
        logger.info("saved checkpoint %s", self.directory / str(step))
        return True

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _write_file_sizes(step_dir: Path) -> None:
    sizes = {
        path.relative_to(step_dir).as_posix(): path.stat().st_size
        for path in sorted(step_dir.rglob("*"))
        if path.is_file() and path.name != _FILE_SIZES
    }
    temporary = step_dir / f".{_FILE_SIZES}.tmp"
    temporary.write_text(json.dumps(sizes, indent=1), encoding="utf-8")
    os.replace(temporary, step_dir / _FILE_SIZES)


# --- reading --------------------------------------------------------------------------------


def available_steps(run_dir: str | Path) -> list[int]:
    """Return the steps with a complete checkpoint in `run_dir` in ascending order, or []."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    manager = _manager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def latest_step(run_dir: str | Path) -> int | None:
    steps = available_steps(run_dir)
    return steps[-1] if steps else None


def _resolve_step(run_dir: str | Path, step: int | None) -> int:
    steps = available_steps(run_dir)
    if not steps:
        raise CheckpointError(
            f"no checkpoints in {checkpoint_dir(run_dir)}; train first or pass the run "
            "directory of a run that saved one"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(
            f"checkpoint step {step} not found in {checkpoint_dir(run_dir)}; available steps: "
            f"{', '.join(map(str, steps))}"
        )
    return step


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _shapes_by_path(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    )[0]
    return {_path_name(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}


def _check_matches(stored, target, *, item: str, where: str) -> None:
    """Raise CheckpointError at the first path, shape or dtype where `stored` differs."""
    stored_shapes = _shapes_by_path(stored)
    target_shapes = _shapes_by_path(target)
    missing = [name for name in target_shapes if name not in stored_shapes]
    if missing:
        raise CheckpointError(
            f"{where} does not match: {item} entry {missing[0]} is missing from the checkpoint "
            f"({len(missing)} missing in all); was it written with another config?"
        )
    unexpected = [name for name in stored_shapes if name not in target_shapes]
    if unexpected:
        raise CheckpointError(
            f"{where} does not match: the checkpoint has {item} entry {unexpected[0]} that the "
            f"target lacks ({len(unexpected)} unexpected in all); was it written with another "
            "config?"
        )
    for name, (shape, dtype) in target_shapes.items():
        stored_shape, stored_dtype = stored_shapes[name]
        if stored_shape != shape:
            raise CheckpointError(
                f"{where} does not match: {item} {name} has shape {stored_shape} in the "
                f"checkpoint but {shape} in the target; check model settings against the "
                "run's config.yaml"
            )
        if stored_dtype != dtype:
            raise CheckpointError(
                f"{where} does not match: {item} {name} has dtype {stored_dtype} in the "
                f"checkpoint but {dtype} in the target"
            )


def _restore_target(tree):
    """ShapeDtypeStructs with a sharding, so Orbax restores jax.Arrays rather than numpy."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def to_struct(leaf):
        sharding = getattr(leaf, "sharding", None) or default
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(to_struct, tree)


def _check_file_sizes(step_dir: Path, items: tuple[str, ...], where: str) -> None:
    """Raise CheckpointError when a file of `items` is missing or differs in size from
    `file_sizes.json`. A step saved without that record is restored unchecked."""
    try:
        sizes = json.loads((step_dir / _FILE_SIZES).read_text(encoding="utf-8"))
    except FileNotFoundError:
        logger.warning("%s has no %s; restoring without checking file sizes", where, _FILE_SIZES)
        return
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{where} is corrupt: {_FILE_SIZES} is unreadable ({error}); delete {step_dir} to "
            "use an earlier step"
        ) from None
    for name, expected in sizes.items():
        if name.split("/")[0] not in items:
            continue
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(
                f"{where} is corrupt: file {name} is missing; delete {step_dir} to use an "
                "earlier step"
            )
        actual = path.stat().st_size
        if actual != expected:
            raise CheckpointError(
                f"{where} is corrupt: file {name} has {actual} bytes, but {expected} were "
                f"written; delete {step_dir} to use an earlier step"
            )


def _item_metadata(item_dir: Path):
    if not item_dir.is_dir():
        raise FileNotFoundError(f"item folder {item_dir.name} is missing")
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(epath.Path(item_dir))
    finally:
        handler.close()


def _read_items(run_dir: str | Path, step: int, targets: Mapping[str, Any], json_items: tuple[str, ...] = ()):
    """Check `targets` against the stored metadata of `step`, then restore those items."""
    directory = checkpoint_dir(run_dir)
    where = f"checkpoint step {step} in {directory}"
    _check_file_sizes(directory / str(step), (*targets, *json_items), where)
    manager = _manager(directory)
    try:
        try:
            # Per item, because the manager's item_metadata opens the arrays of every item.
            stored = {name: _item_metadata(directory / str(step) / name) for name in targets}
        except _READ_ERRORS as error:
            raise CheckpointError(
                f"{where} is corrupt or truncated ({_first_line(error)}); delete "
                f"{directory / str(step)} to use an earlier step"
            ) from None
        for name, target in targets.items():
            if stored[name] is None:
                raise CheckpointError(
                    f"{where} is corrupt or truncated: the metadata of item {name!r} is "
                    f"missing; delete {directory / str(step)} to use an earlier step"
                )
            tree = stored[name].tree if hasattr(stored[name], "tree") else stored[name]
            _check_matches(tree, target, item=name, where=where)

        args = {name: ocp.args.StandardRestore(_restore_target(target))
                for name, target in targets.items()}
        args.update({name: ocp.args.JsonRestore() for name in json_items})
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**args))
            return {name: restored[name] for name in (*targets, *json_items)}
        # Orbax 0.12.8 wraps a failed array read (for example a zstd decode error from a
        # changed byte) in a bare Exception. Shapes and dtypes were checked above, so an
        # error here comes from the files.
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(
                f"{where} is corrupt or truncated ({_first_line(error)}); delete "
                f"{directory / str(step)} to use an earlier step"
            ) from None
    finally:
        manager.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    # tensorstore appends its whole JSON spec to the message; the reason comes before it.
    message = message.split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {message[:300]}"


def restore_train_state(
    run_dir: str | Path, target_state: TrainState, step: int | None = None
) -> tuple[TrainState, dict[str, Any]]:
    """Restore the train state of `step` (default: the latest) and its data position.

    `target_state` fixes the structure, shapes, dtypes and shardings; concrete arrays and
    `jax.ShapeDtypeStruct` leaves both work (see `abstract_train_state`). Returns the state
    and the `data_position` JSON saved with it. Raises CheckpointError when there is no
    checkpoint, the step is missing, the files are corrupt, or the stored tree differs.
    """
    step = _resolve_step(run_dir, step)
    items = _read_items(
        run_dir,
        step,
        {_PARAMS: target_state.params, _TRAIN_STATE: _train_tree(target_state)},
        json_items=(_DATA_POSITION,),
    )
    train = items[_TRAIN_STATE]
    stored_step = int(train["step"])
    if stored_step != step:
        raise CheckpointError(
            f"checkpoint step {step} in {checkpoint_dir(run_dir)} is corrupt: it stores step "
            f"{stored_step}"
        )

    loss_scale = None
    if target_state.loss_scale is not None:
        loss_scale = target_state.loss_scale.replace(
            scale=train["loss_scale"]["scale"], good_steps=train["loss_scale"]["good_steps"]
        )
    # `replace` keeps the target's class and static fields (such as the growth interval).
    state = target_state.replace(
        params=items[_PARAMS],
        opt_state=train["opt_state"],
        step=train["step"],
        rng=jax.random.wrap_key_data(train["rng"]),
        loss_scale=loss_scale,
    )
    data_position = items[_DATA_POSITION]
    if not isinstance(data_position, dict):
        raise CheckpointError(
            f"checkpoint step {step} in {checkpoint_dir(run_dir)} is corrupt: its data "
            f"position is {json.dumps(data_position)[:100]}, not a JSON object"
        )
    logger.info("restored train state of step %d from %s", step, checkpoint_dir(run_dir))
    return state, data_position


def restore_params(run_dir: str | Path, model_config: ModelConfig, step: int | None = None):
    """Restore only the parameters of `step` (default: the latest) for `model_config`.

    Raises CheckpointError like `restore_train_state`; a shape difference names the parameter
    path and both shapes.
    """
    step = _resolve_step(run_dir, step)
    items = _read_items(run_dir, step, {_PARAMS: param_shapes(model_config)})
    logger.info("restored parameters of step %d from %s", step, checkpoint_dir(run_dir))
    return items[_PARAMS]
