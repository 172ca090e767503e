"""Hugging Face config.json: read it into a ModelConfig, or write one from a ModelConfig.

config.json stores RoPE settings in one of two forms. transformers 4.x reads the top-level
`rope_theta` and `rope_scaling` ({"rope_type": "llama3", "factor", "low_freq_factor",
"high_freq_factor", "original_max_position_embeddings"}). transformers 5.x nests the same keys,
plus `rope_theta`, in `rope_parameters`. Import reads either form, and both when they agree.
Export writes both: transformers 4.x ignores `rope_parameters`, and transformers 5.25 takes a
non-null `rope_scaling` before `rope_parameters` and fills `rope_theta` from the top level
(`convert_rope_params_to_dict`), so both versions read the same values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxllm.config import ConfigError, ModelConfig, RopeScaling
from jaxllm.convert.layout import ConversionError

CONFIG_FILE = "config.json"
# rope_theta when config.json has none: transformers 5.25's
# RotaryEmbeddingConfigMixin.default_theta.
DEFAULT_ROPE_THETA = 10000.0
_SCALING_KEYS = (
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"
)


def _read_json(path: Path, description: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{description} {path} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{description} {path} is not valid JSON ({error})") from None


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """Read `config.json` of a Hugging Face model folder as a dict."""
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(
            f"{path} not found; a Hugging Face model folder needs the config.json that "
            "save_pretrained writes"
        )
    values = _read_json(path, "model config")
    if not isinstance(values, dict):
        raise ConversionError(f"{path} must contain a JSON object")
    return values


def _require_int(hf_config: Mapping[str, Any], key: str) -> int:
    value = hf_config.get(key)
    if value is None:
        raise ConversionError(f"config.json is missing {key}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConversionError(f"config.json {key} must be an integer, got {value!r}")
    return value


def _rope_type(settings: Mapping[str, Any]) -> str:
    return settings.get("rope_type", settings.get("type")) or "default"


def _scaling_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {"rope_type": _rope_type(settings), **{key: settings.get(key) for key in _SCALING_KEYS}}


def _rope_from_hf(hf_config: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read rope_theta and Llama 3.1 scaling from either config.json form (module docstring)."""
    nested = hf_config.get("rope_parameters")
    legacy = hf_config.get("rope_scaling")
    for key, value in (("rope_parameters", nested), ("rope_scaling", legacy)):
        if value is not None and not isinstance(value, dict):
            raise ConversionError(f"config.json {key} must be an object or null, got {value!r}")
    if nested and legacy and _scaling_fields(nested) != _scaling_fields(legacy):
        raise ConversionError(
            f"config.json has rope_scaling {legacy} and rope_parameters {nested}, which "
            "disagree; remove the one that does not describe the weights"
        )
    nested_theta = (nested or {}).get("rope_theta")
    top_theta = hf_config.get("rope_theta")
    both_set = nested_theta is not None and top_theta is not None
    if both_set and float(nested_theta) != float(top_theta):
        raise ConversionError(
            f"config.json has rope_theta {top_theta} and rope_parameters.rope_theta "
            f"{nested_theta}, which disagree; keep one"
        )
    settings = legacy or nested or {}
    theta = DEFAULT_ROPE_THETA
    if top_theta is not None:
        theta = top_theta
    if nested_theta is not None:
        theta = nested_theta

    for source in (hf_config, settings):
        partial = source.get("partial_rotary_factor")
        if partial is not None and float(partial) != 1.0:
            raise ConversionError(
                f"config.json sets partial_rotary_factor {partial}; jaxllm rotates the whole "
                "head (factor 1.0) only"
            )
    rope_type = _rope_type(settings)
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(
            f"config.json uses RoPE type {rope_type!r}; only 'default' and 'llama3' "
            "(Llama 3.1 frequency scaling) convert"
        )
    missing = [key for key in _SCALING_KEYS[:3] if settings.get(key) is None]
    if missing:
        raise ConversionError(f"config.json llama3 RoPE scaling is missing {', '.join(missing)}")
    # transformers 5.25 falls back to max_position_embeddings when this key is absent.
    original = settings.get("original_max_position_embeddings") or _require_int(
        hf_config, "max_position_embeddings"
    )
    scaling = RopeScaling(
        factor=float(settings["factor"]),
        low_freq_factor=float(settings["low_freq_factor"]),
        high_freq_factor=float(settings["high_freq_factor"]),
        original_max_seq_len=int(original),
    )
    return float(theta), scaling


def model_config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a `LlamaForCausalLM` config.json.

    Raises ConversionError for another architecture, biases, an activation other than SiLU,
    RoPE other than plain or Llama 3.1 scaled, and missing or invalid sizes.
    """
    architectures = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    if model_type != "llama" or any(name != "LlamaForCausalLM" for name in architectures):
        listed = ", ".join(architectures) or "none"
        raise ConversionError(
            f"unsupported model in config.json: model_type {model_type!r}, architectures "
            f"{listed}; only LlamaForCausalLM (model_type 'llama') converts"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise ConversionError(
                f"config.json sets {key}: true; jaxllm Llama layers have no biases"
            )
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise ConversionError(
            f"config.json sets hidden_act {activation!r}; jaxllm uses SwiGLU (silu) only"
        )

    embed_dim = _require_int(hf_config, "hidden_size")
    num_heads = _require_int(hf_config, "num_attention_heads")
    head_dim = hf_config.get("head_dim")
    if head_dim is None:
        # transformers derives it the same way when config.json omits it.
        if embed_dim % num_heads:
            raise ConversionError(
                f"config.json is missing head_dim, and hidden_size {embed_dim} is not a "
                f"multiple of num_attention_heads {num_heads}"
            )
        head_dim = embed_dim // num_heads
    num_kv_heads = hf_config.get("num_key_value_heads") or num_heads
    rope_theta, rope_scaling = _rope_from_hf(hf_config)
    try:
        return ModelConfig(
            vocab_size=_require_int(hf_config, "vocab_size"),
            num_layers=_require_int(hf_config, "num_hidden_layers"),
            embed_dim=embed_dim,
            mlp_dim=_require_int(hf_config, "intermediate_size"),
            num_heads=num_heads,
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            max_seq_len=_require_int(hf_config, "max_position_embeddings"),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            init_std=float(hf_config.get("initializer_range", 0.02)),
        )
    except ConfigError as error:
        raise ConversionError(f"config.json describes an invalid model: {error}") from None


def hf_config_from_model(
    config: ModelConfig,
    *,
    dtype: str = "float32",
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """Return a `LlamaForCausalLM` config.json dict with both RoPE forms (module docstring)."""
    rope_scaling = None
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
        }
        rope_parameters = {**rope_scaling, "rope_theta": config.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        # transformers 5.x reads `dtype`, 4.x `torch_dtype`.
        "dtype": dtype,
        "torch_dtype": dtype,
    }
