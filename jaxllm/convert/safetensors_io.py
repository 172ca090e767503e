"""Safetensors weights of a Hugging Face model folder, in one file or in shards with an index.

Weights are read from safetensors files only. Pickle-based files (.bin, .pt) can run arbitrary
code when loaded, so they are never opened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from jaxllm.convert.hf_config import _read_json
from jaxllm.convert.layout import ConversionError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
# Suffixes of weight files that are Python pickles, which import rejects without opening them.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})
# Shard size above which an export is split, in bytes (decimal gigabytes, as transformers counts).
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
# safetensors dtype codes that import reads; each is upcast to float32.
IMPORT_DTYPES = frozenset({"F32", "F16", "BF16"})

# rw-r--r--: safetensors 0.8 creates files readable by their owner only.
READABLE_FILE_MODE = 0o644


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / SAFETENSORS_INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index} has no weight_map")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ConversionError(f"shard {file.name} listed in {index} not found")
        return files
    if (hf_dir / SAFETENSORS_FILE).is_file():
        return [hf_dir / SAFETENSORS_FILE]
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(path.name for path in hf_dir.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConversionError(
            f"{hf_dir} has weights only in pickle files ({', '.join(pickles)}), which are not "
            "loaded because unpickling can run arbitrary code; convert them to safetensors "
            "first, for example by loading the model with transformers and calling "
            "save_pretrained"
        )
    raise ConversionError(f"no model weights in {hf_dir}; expected {SAFETENSORS_FILE} or a sharded "
                          f"{SAFETENSORS_INDEX_FILE}")


def read_hf_weights(hf_dir: str | Path) -> dict[str, np.ndarray]:
    """Read every tensor of a model folder's safetensors files, in its stored dtype.

    safetensors 0.8 returns BF16 tensors as `ml_dtypes.bfloat16` arrays. Raises
    ConversionError for a dtype other than F32, F16 or BF16, a tensor stored twice, or a
    file that is not valid safetensors.
    """
    hf_dir = Path(hf_dir)
    state: dict[str, np.ndarray] = {}
    for file in _weight_files(hf_dir):
        try:
            with safetensors.safe_open(file, framework="numpy") as reader:
                for name in reader.keys():
                    if name in state:
                        raise ConversionError(
                            f"tensor {name} is stored twice (again in {file.name})"
                        )
                    dtype = reader.get_slice(name).get_dtype()
                    if dtype not in IMPORT_DTYPES:
                        raise ConversionError(
                            f"tensor {name} in {file.name} has dtype {dtype}; only "
                            f"{', '.join(sorted(IMPORT_DTYPES))} weights convert"
                        )
                    state[name] = reader.get_tensor(name)
        except safetensors.SafetensorError as error:
            raise ConversionError(f"{file} is not a valid safetensors file ({error})") from None
    return state


def _plan_shards(
    state: Mapping[str, np.ndarray], max_shard_bytes: int
) -> list[dict[str, np.ndarray]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` each.

    A tensor larger than the limit gets a shard of its own.
    """
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards


def write_hf_weights(
    state: Mapping[str, np.ndarray],
    out_dir: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write tensors as `model.safetensors`, or as shards plus an index when over the limit.

    Returns the files written. The `format: pt` metadata is what transformers expects of a
    safetensors file that it loads into PyTorch.
    """
    if max_shard_bytes < 1:
        raise ConversionError(
            f"the maximum shard size must be positive, got {max_shard_bytes} bytes"
        )
    out_dir = Path(out_dir)
    metadata = {"format": "pt"}
    shards = _plan_shards(state, max_shard_bytes)
    if len(shards) == 1:
        path = out_dir / SAFETENSORS_FILE
        safetensors.numpy.save_file(shards[0], path, metadata=metadata)
        path.chmod(READABLE_FILE_MODE)
        return [path]

    written = []
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, path, metadata=metadata)
        path.chmod(READABLE_FILE_MODE)
        weight_map.update({name: path.name for name in shard})
        written.append(path)
    index = {
        "metadata": {"total_size": sum(tensor.nbytes for tensor in state.values())},
        "weight_map": weight_map,
    }
    index_path = out_dir / SAFETENSORS_INDEX_FILE
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*written, index_path]
