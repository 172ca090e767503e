"""Shared setup of the parity suite: seeded models on both sides, weight transfer and comparison.

Every model starts on the torch side (torchref, seeded) and reaches jaxllm through
`jaxllm.convert.layout.from_hf_state_dict`, the same mapping the Hugging Face importer uses. A
weight-identity precheck then compares every tensor exactly, so a rung that fails points at the
computation and not at the transfer. `compare` is the one place that measures differences; the
tests and `python -m parity` both print its report.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

import torchref
from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.convert.layout import from_hf_state_dict, to_hf_state_dict

SEED = 0
DEVICES = ("cpu", "gpu")
DTYPES = ("float32", "bfloat16")
_JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# head_dim 16 with rope_theta 1e4 gives wavelengths from 6.3 to 2e4 positions. With
# original_max_seq_len 32, high_freq_factor 4 and low_freq_factor 1 the band limits are 8 and
# 32 positions, so the frequencies fall in all three Llama 3.1 bands (kept, blended, divided).
TEST_ROPE_SCALING = {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 32
}

# The float32 test model. init_std 0.1, close to 1/sqrt(embed_dim), keeps activations and
# logits of order 1, so the absolute tolerances mean the same at every rung and greedy choices
# are not near ties. The training default 0.02 would make them tiny, and every difference small.
# Norm weights are drawn around 1 too (see `make_models`), so a swapped norm shows up.
TEST_MODEL = {
    "vocab_size": 128,
    "num_layers": 2,
    "embed_dim": 64,
    "mlp_dim": 160,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "rope_theta": 10000.0,
    "rope_scaling": TEST_ROPE_SCALING,
    "norm_eps": 1e-5,
    "max_seq_len": 128,
    "tie_embeddings": False,
    "init_std": 0.1,
}
# Standard deviation of the norm weights around 1.
NORM_WEIGHT_STD = 0.2


def pin_precision() -> None:
    """Make both frameworks run float32 matmuls in full float32.

    Without this, JAX on a GPU may use reduced-precision (bfloat16) passes and PyTorch on
    Ampere and later GPUs may use TF32. CPU results do not change.
    """
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@functools.cache
def gpu_available() -> bool:
    """True when both JAX and PyTorch see a CUDA GPU."""
    try:
        jax_gpus = jax.devices("gpu")
    except RuntimeError:
        return False
    return bool(jax_gpus) and torch.cuda.is_available()


def available_devices() -> list[str]:
    return ["cpu", "gpu"] if gpu_available() else ["cpu"]


@dataclasses.dataclass(frozen=True)
class RungContext:
    """Device ("cpu" or "gpu") and dtype ("float32" or "bfloat16") of one rung run."""

    device: str
    dtype: str
    seed: int = SEED

    @property
    def jax_dtype(self):
        return _JAX_DTYPES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @property
    def jax_device(self) -> jax.Device:
        return jax.devices(self.device)[0]

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if self.device == "gpu" else "cpu")

    def rng(self, offset: int = 0) -> np.random.Generator:
        """A numpy generator for inputs; `offset` separates the draws of one rung."""
        return np.random.default_rng(self.seed * 1000 + offset)

    def to_torch(self, array: np.ndarray, *, cast: bool = True) -> torch.Tensor:
        """Copy a numpy array to the torch device, in the rung dtype when `cast` and floating."""
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.torch_device)
        if cast and tensor.is_floating_point():
            tensor = tensor.to(self.torch_dtype)
        return tensor

    def to_jax(self, array: np.ndarray, *, cast: bool = True) -> jax.Array:
        """Copy a numpy array to the JAX device, in the rung dtype when `cast` and floating."""
        value = jnp.asarray(array)
        if cast and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(self.jax_dtype)
        return jax.device_put(value, self.jax_device)


# --- configs and models ---------------------------------------------------------------------


def model_values(**overrides: Any) -> dict[str, Any]:
    """TEST_MODEL with `overrides`, as plain values that both config classes accept."""
    values = {**TEST_MODEL, **overrides}
    if values["rope_scaling"] is not None:
        values["rope_scaling"] = dict(values["rope_scaling"])
    return values


def configs(**overrides: Any) -> tuple[ModelConfig, torchref.LlamaConfig]:
    """Build the jaxllm and torchref configs of one model from the same values."""
    values = model_values(**overrides)
    scaling = values["rope_scaling"]
    jax_scaling = None if scaling is None else RopeScaling(**scaling)
    jax_config = ModelConfig(**{**values, "rope_scaling": jax_scaling})
    return jax_config, torchref.LlamaConfig.from_dict(values)


def _torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Return a torch state dict as float32 numpy arrays (bfloat16 widens exactly)."""
    state = model.state_dict()
    return {name: tensor.detach().float().cpu().numpy() for name, tensor in state.items()}


def check_weight_identity(params, model: torch.nn.Module, config: ModelConfig) -> None:
    """Raise AssertionError unless every tensor of `params` equals the torch model's exactly.

    jaxllm params are float32 and cast to the compute dtype where they are used, so they are
    rounded to the torch model's dtype before the comparison.
    """
    torch_dtype = next(model.parameters()).dtype
    expected = _torch_state(model)
    converted = to_hf_state_dict(params, config)
    if set(converted) != set(expected):
        raise AssertionError(
            "weight-identity precheck: tensor names differ; only in jaxllm: "
            f"{sorted(set(converted) - set(expected))}, only in torch: "
            f"{sorted(set(expected) - set(converted))}"
        )
    for name, tensor in converted.items():
        rounded = torch.from_numpy(np.array(tensor, np.float32)).to(torch_dtype).float().numpy()
        if rounded.shape != expected[name].shape:
            raise AssertionError(
                f"weight-identity precheck: {name} has shape {rounded.shape} in jaxllm but "
                f"{expected[name].shape} in torch"
            )
        if not np.array_equal(rounded, expected[name]):
            index = np.unravel_index(np.argmax(np.abs(rounded - expected[name])), rounded.shape)
            raise AssertionError(
                f"weight-identity precheck: {name} differs at index {tuple(map(int, index))}: "
                f"jaxllm {rounded[index]!r}, torch {expected[name][index]!r}"
            )


@dataclasses.dataclass
class ModelPair:
    """One model on both sides with identical weights."""

    config: ModelConfig
    torch_config: torchref.LlamaConfig
    params: Any
    torch_model: torchref.Llama

    def layer(self, index: int = 0) -> dict:
        """Return the jaxllm params of one layer, sliced from the stacked L axis."""
        return jax.tree.map(lambda leaf: leaf[index], self.params["layers"])


def make_models(ctx: RungContext, **overrides: Any) -> ModelPair:
    """Build a seeded torchref model and the jaxllm params converted from its weights.

    The torch model is drawn in float32 on the CPU (so the weights do not depend on the
    device), its norm weights are drawn around 1, and then it moves to the rung's device and
    dtype. jaxllm params stay float32. The weight-identity precheck runs before returning.
    """
    config, torch_config = configs(**overrides)
    model = torchref.Llama(torch_config, seed=ctx.seed).eval()
    generator = torch.Generator().manual_seed(ctx.seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1.0 + NORM_WEIGHT_STD * noise)
    params = from_hf_state_dict(_torch_state(model), config)
    params = jax.device_put(jax.tree.map(jnp.asarray, params), ctx.jax_device)
    model = model.to(device=ctx.torch_device, dtype=ctx.torch_dtype)
    check_weight_identity(params, model, config)
    return ModelPair(config=config, torch_config=torch_config, params=params, torch_model=model)


def random_tokens(
    ctx: RungContext, config: ModelConfig, shape: tuple[int, ...], offset: int = 0
) -> np.ndarray:
    return ctx.rng(offset).integers(0, config.vocab_size, shape, dtype=np.int32)


def left_padded_mask(lengths: list[int], total: int) -> np.ndarray:
    """Return a [B, total] bool mask that is True on the last `lengths[b]` slots of row b."""
    mask = np.zeros((len(lengths), total), bool)
    for row, length in enumerate(lengths):
        mask[row, total - length:] = True
    return mask


def positions_for(mask: np.ndarray) -> np.ndarray:
    """Per-row positions of a left-padded mask: 0 at the first real token, 0 on padding."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def to_numpy(value) -> np.ndarray:
    """Any torch tensor or JAX array as a numpy array, floating types widened to float32."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        return value.cpu().numpy()
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16:
        array = array.astype(np.float32)
    return array


# --- comparison -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Differences between an actual and a desired output, and whether they are within tolerance.

    max_rel is over elements whose desired value is not zero. For a dict output the maxima are
    over all tensors, and `max_abs_at` names the tensor as well as the index. An element
    passes when |actual - desired| <= atol + rtol * |desired|, as in numpy.testing.assert_allclose.
    """

    name: str
    max_abs: float
    max_abs_at: str
    max_rel: float
    max_rel_at: str
    atol: float
    rtol: float
    passed: bool
    problem: str = ""

    def report(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        text = (
            f"{self.name}: {status}: max-abs {self.max_abs:.3e} at {self.max_abs_at}, "
            f"max-rel {self.max_rel:.3e} at {self.max_rel_at} "
            f"(atol {self.atol:g}, rtol {self.rtol:g})"
        )
        return f"{text}; {self.problem}" if self.problem else text


def _flatten(value, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(value, Mapping):
        flat = {}
        for key, item in value.items():
            separator = "/" if isinstance(item, Mapping) else ""
            flat.update(_flatten(item, f"{prefix}{key}{separator}"))
        return flat
    return {prefix: to_numpy(value)}


def _index_text(tensor_name: str, index: tuple[int, ...]) -> str:
    where = f"[{', '.join(map(str, index))}]"
    return f"{tensor_name}{where}" if tensor_name else where


def compare(name: str, actual, desired, *, atol: float, rtol: float) -> Comparison:
    """Compare two arrays, or two dicts of arrays with the same keys, elementwise.

    Shape or key differences and non-finite values fail the comparison with a `problem` text.
    """
    actual_flat, desired_flat = _flatten(actual), _flatten(desired)
    if set(actual_flat) != set(desired_flat):
        return Comparison(name, float("nan"), "-", float("nan"), "-", atol, rtol, False,
                          f"keys differ: {sorted(set(actual_flat) ^ set(desired_flat))}")
    max_abs, max_abs_at, max_rel, max_rel_at = 0.0, "-", 0.0, "-"
    passed, problem = True, ""
    for key in sorted(desired_flat):
        a = actual_flat[key].astype(np.float64)
        d = desired_flat[key].astype(np.float64)
        if a.shape != d.shape:
            return Comparison(name, float("nan"), key, float("nan"), key, atol, rtol, False,
                              f"{key or 'output'} has shape {a.shape}, expected {d.shape}")
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(d))):
            passed, problem = False, f"{key or 'output'} contains inf or NaN"
            continue
        if a.size == 0:
            continue
        diff = np.abs(a - d)
        index = np.unravel_index(np.argmax(diff), diff.shape)
        if diff[index] > max_abs or max_abs_at == "-":
            max_abs, max_abs_at = float(diff[index]), _index_text(key, tuple(map(int, index)))
        nonzero = d != 0
        if np.any(nonzero):
            rel = np.where(nonzero, diff / np.where(nonzero, np.abs(d), 1.0), 0.0)
            index = np.unravel_index(np.argmax(rel), rel.shape)
            if rel[index] > max_rel or max_rel_at == "-":
                max_rel, max_rel_at = float(rel[index]), _index_text(key, tuple(map(int, index)))
        if np.any(diff > atol + rtol * np.abs(d)):
            passed = False
    return Comparison(name, max_abs, max_abs_at, max_rel, max_rel_at, atol, rtol, passed, problem)
