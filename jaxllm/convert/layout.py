"""Parameter layout mapping between jaxllm and Hugging Face Llama state dicts.

jaxllm stacks layer parameters on a leading L axis and stores kernels as [in, out] with the
head axes split out; Hugging Face (and torchref) keep one [out, in] `nn.Linear` weight per layer:

    jaxllm                               Hugging Face, per layer i
    embed/embedding      [V, D]          model.embed_tokens.weight           [V, D]
    layers/attn/q_proj   [L, D, N, H]    model.layers.i.self_attn.q_proj     [N*H, D]
    layers/attn/k_proj   [L, D, K, H]    model.layers.i.self_attn.k_proj     [K*H, D]
    layers/attn/v_proj   [L, D, K, H]    model.layers.i.self_attn.v_proj     [K*H, D]
    layers/attn/o_proj   [L, N, H, D]    model.layers.i.self_attn.o_proj     [D, N*H]
    layers/attn_norm     [L, D]          model.layers.i.input_layernorm      [D]
    layers/mlp_norm      [L, D]          model.layers.i.post_attention_layernorm [D]
    layers/mlp/gate_proj [L, D, F]       model.layers.i.mlp.gate_proj        [F, D]
    layers/mlp/up_proj   [L, D, F]       model.layers.i.mlp.up_proj          [F, D]
    layers/mlp/down_proj [L, F, D]       model.layers.i.mlp.down_proj        [D, F]
    final_norm/scale     [D]             model.norm.weight                   [D]
    lm_head              [D, V]          lm_head.weight (untied only)        [V, D]

Both sides use the rotate-half RoPE layout, so q and k rows need no permutation.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import UserInputError


class ConversionError(UserInputError):
    """A state dict that does not match the model; the message names the tensor."""


def _layer_names(i: int) -> dict[tuple[str, ...], str]:
    prefix = f"model.layers.{i}"
    return {
        ("attn", "q_proj"): f"{prefix}.self_attn.q_proj.weight",
        ("attn", "k_proj"): f"{prefix}.self_attn.k_proj.weight",
        ("attn", "v_proj"): f"{prefix}.self_attn.v_proj.weight",
        ("attn", "o_proj"): f"{prefix}.self_attn.o_proj.weight",
        ("attn_norm", "scale"): f"{prefix}.input_layernorm.weight",
        ("mlp_norm", "scale"): f"{prefix}.post_attention_layernorm.weight",
        ("mlp", "gate_proj"): f"{prefix}.mlp.gate_proj.weight",
        ("mlp", "up_proj"): f"{prefix}.mlp.up_proj.weight",
        ("mlp", "down_proj"): f"{prefix}.mlp.down_proj.weight",
    }


def _to_linear(kernel: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """One layer's jaxllm kernel -> the [out, in] weight of an nn.Linear."""
    if path == ("attn", "o_proj"):
        N, H, D = kernel.shape
        return kernel.reshape(N * H, D).T
    if path[0] == "attn":
        D = kernel.shape[0]
        return kernel.reshape(D, -1).T
    if path[0] == "mlp":
        return kernel.T
    return kernel


def _from_linear(weight: np.ndarray, path: tuple[str, ...], config: ModelConfig) -> np.ndarray:
    """An nn.Linear [out, in] weight -> one layer's jaxllm kernel."""
    N, K, H, D = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    if path == ("attn", "o_proj"):
        return weight.T.reshape(N, H, D)
    if path == ("attn", "q_proj"):
        return weight.T.reshape(D, N, H)
    if path[0] == "attn":
        return weight.T.reshape(D, K, H)
    if path[0] == "mlp":
        return weight.T
    return weight


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The expected Hugging Face tensor name -> shape for a model config."""
    N, K, H = config.num_heads, config.num_kv_heads, config.head_dim
    D, F, V = config.embed_dim, config.mlp_dim, config.vocab_size
    per_layer = {
        ("attn", "q_proj"): (N * H, D),
        ("attn", "k_proj"): (K * H, D),
        ("attn", "v_proj"): (K * H, D),
        ("attn", "o_proj"): (D, N * H),
        ("attn_norm", "scale"): (D,),
        ("mlp_norm", "scale"): (D,),
        ("mlp", "gate_proj"): (F, D),
        ("mlp", "up_proj"): (F, D),
        ("mlp", "down_proj"): (D, F),
    }
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(config.num_layers):
        for path, name in _layer_names(i).items():
            shapes[name] = per_layer[path]
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def to_hf_state_dict(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Flatten jaxllm params into Hugging Face Llama tensor names and [out, in] layouts."""
    params = _as_numpy(params)
    state = {
        "model.embed_tokens.weight": params["embed"]["embedding"],
        "model.norm.weight": params["final_norm"]["scale"],
    }
    layers = params["layers"]
    for i in range(config.num_layers):
        for path, name in _layer_names(i).items():
            state[name] = np.ascontiguousarray(_to_linear(layers[path[0]][path[1]][i], path))
    if not config.tie_embeddings:
        state["lm_head.weight"] = np.ascontiguousarray(params["lm_head"].T)
    return state


def from_hf_state_dict(
    state: Mapping[str, np.ndarray], config: ModelConfig, dtype=np.float32
) -> dict:
    """Build jaxllm params from a Hugging Face Llama state dict, checking every name and shape.

    A tied model's state dict may also carry `lm_head.weight`; it is ignored when it equals the
    embedding and rejected otherwise. Other unexpected tensors (biases, rotary buffers) are
    rejected, so a model of another architecture fails here rather than loading silently.
    """
    expected = hf_shapes(config)
    for name, shape in expected.items():
        if name not in state:
            raise ConversionError(f"missing tensor {name} (expected shape {list(shape)})")
        actual = tuple(state[name].shape)
        if actual != shape:
            raise ConversionError(
                f"tensor {name} has shape {list(actual)} but the config expects {list(shape)}"
            )
    for name in state:
        if name in expected:
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            if np.array_equal(np.asarray(state[name]), np.asarray(state["model.embed_tokens.weight"])):
                continue
            raise ConversionError(
                "lm_head.weight differs from model.embed_tokens.weight but the config has "
                "tie_embeddings: true; set model.tie_embeddings to false"
            )
        raise ConversionError(f"unexpected tensor {name}; it is not part of a Llama model")

    def load(name: str) -> np.ndarray:
        return np.asarray(state[name], dtype=dtype)

    layers: dict = {}
    for path in _layer_names(0):
        stacked = [
            _from_linear(load(_layer_names(i)[path]), path, config) for i in range(config.num_layers)
        ]
        layers.setdefault(path[0], {})[path[1]] = np.stack(stacked)
    params = {
        "embed": {"embedding": load("model.embed_tokens.weight")},
        "layers": layers,
        "final_norm": {"scale": load("model.norm.weight")},
    }
    if not config.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(load("lm_head.weight").T)
    return params


def _as_numpy(tree):
    if isinstance(tree, Mapping):
        return {key: _as_numpy(value) for key, value in tree.items()}
    return np.asarray(tree)
