"""Hugging Face Llama folders: config.json, safetensors weights and tokenizer.json.

`import_hf_run` turns a `LlamaForCausalLM` folder into a jaxllm run directory (config.yaml,
tokenizer.json and an Orbax checkpoint at step 0). `export_run_to_hf` writes a run's checkpoint
as a folder that `transformers.LlamaForCausalLM.from_pretrained` loads. The tensor names and
layouts are mapped by `jaxllm.convert.layout`.

config.json stores RoPE settings in one of two forms. transformers 4.x reads the top-level
`rope_theta` and `rope_scaling` ({"rope_type": "llama3", "factor", "low_freq_factor",
"high_freq_factor", "original_max_position_embeddings"}). transformers 5.x nests the same keys,
plus `rope_theta`, in `rope_parameters`. Import reads either form, and both when they agree.
Export writes both: transformers 4.x ignores `rope_parameters`, and transformers 5.25 takes a
non-null `rope_scaling` before `rope_parameters` and fills `rope_theta` from the top level
(`convert_rope_params_to_dict`), so both versions read the same values.

Weights are read from safetensors files only. Pickle-based files (.bin, .pt) can run arbitrary
code when loaded, so they are never opened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers

from jaxllm.checkpoint import CheckpointWriter, restore_params
from jaxllm.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    RopeScaling,
    read_config,
    save_config,
)
from jaxllm.convert.layout import ConversionError, from_hf_state_dict, to_hf_state_dict
from jaxllm.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    Tokenizer,
)
from jaxllm.precision import LossScale, uses_loss_scaling
from jaxllm.train.optim import make_optimizer
from jaxllm.train.state import TrainState

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
RUN_CONFIG_FILE = "config.yaml"
# Suffixes of weight files that are Python pickles, which import rejects without opening them.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})
# Shard size above which an export is split, in bytes (decimal gigabytes, as transformers counts).
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
# safetensors dtype codes that import reads; each is upcast to float32.
IMPORT_DTYPES = frozenset({"F32", "F16", "BF16"})
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# rope_theta when config.json has none: transformers 5.25's
# RotaryEmbeddingConfigMixin.default_theta.
DEFAULT_ROPE_THETA = 10000.0
# Checkpoint step of an imported model.
IMPORT_STEP = 0
_RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_\d+\|>")
_SCALING_KEYS = (
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"
)


# --- config.json ----------------------------------------------------------------------------


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


# --- safetensors weights --------------------------------------------------------------------


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
        return [path]

    written = []
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, path, metadata=metadata)
        weight_map.update({name: path.name for name in shard})
        written.append(path)
    index = {
        "metadata": {"total_size": sum(tensor.nbytes for tensor in state.values())},
        "weight_map": weight_map,
    }
    index_path = out_dir / SAFETENSORS_INDEX_FILE
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*written, index_path]


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


# --- tokenizer ------------------------------------------------------------------------------


def _role_tokens(hf_dir: Path, probe: tokenizers.Tokenizer) -> dict[str, str]:
    """Find the BOS, EOS and PAD token strings a model folder declares.

    tokenizer_config.json comes first (a string or an AddedToken object per role), then the
    `<role>_token_id` of config.json and generation_config.json (the first id of a list).
    """
    sources = []
    for name in (TOKENIZER_CONFIG_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE):
        path = hf_dir / name
        values = _read_json(path, "file") if path.is_file() else {}
        sources.append(values if isinstance(values, dict) else {})
    tokenizer_config, *id_sources = sources

    roles = {}
    for role in ("bos", "eos", "pad"):
        token = tokenizer_config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and probe.token_to_id(token) is not None:
            roles[role] = token
            continue
        for values in id_sources:
            token_id = values.get(f"{role}_token_id")
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
            if isinstance(token_id, int) and probe.id_to_token(token_id) is not None:
                roles[role] = probe.id_to_token(token_id)
                break
    return roles


def _rename_token(data: dict, old: str, new: str) -> None:
    """Rename token `old` to `new` in a parsed tokenizer.json, keeping its id."""
    for entry in data.get("added_tokens") or []:
        if entry.get("content") == old:
            entry["content"] = new
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list):
        for piece in vocab:
            if piece and piece[0] == old:
                piece[0] = new

    def rename_in(node):
        if isinstance(node, dict):
            return {(new if key == old else key): rename_in(value) for key, value in node.items()}
        if isinstance(node, list):
            return [rename_in(value) for value in node]
        return new if node == old else node

    # The post-processor (for example TemplateProcessing) refers to special tokens by string.
    if data.get("post_processor") is not None:
        data["post_processor"] = rename_in(data["post_processor"])


def tokenizer_from_hf(hf_dir: str | Path, vocab_size: int) -> Tokenizer:
    """Load a model folder's tokenizer.json as a jaxllm Tokenizer that fits `vocab_size`.

    jaxllm finds its special tokens by name (SPECIAL_TOKENS, the Llama 3 names). Each one the
    vocabulary lacks is supplied, keeping ids, in this order of preference:
    1. for BOS, EOS and PAD, the folder's own token for that role is renamed (`<s>` becomes
       `<|begin_of_text|>`) if it is an added special token, is not the model's unknown
       token and has no jaxllm name already;
    2. an unused `<|reserved_special_token_N|>` of a Llama 3 vocabulary is renamed, lowest id
       first, so a Llama 3 tokenizer gets its `<|pad|>` without growing;
    3. the token is appended as a new special token, if its id stays below `vocab_size`.
    Appended tokens have untrained embedding rows.
    Raises ConversionError if tokenizer.json is missing or invalid, or the tokens do not fit.
    """
    hf_dir = Path(hf_dir)
    path = hf_dir / TOKENIZER_FILE
    if not path.is_file():
        raise ConversionError(
            f"{path} not found; jaxllm needs the fast-tokenizer file tokenizer.json (save the "
            "tokenizer with transformers' save_pretrained or the tokenizers library)"
        )
    data = _read_json(path, "tokenizer")
    try:
        probe = tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as error:  # tokenizers raises a plain Exception for invalid content
        raise ConversionError(f"{path} is not a valid tokenizer.json ({error})") from None

    roles = _role_tokens(hf_dir, probe)
    # Only added special tokens are renamed; the model's unknown token is referenced by string.
    unk_token = (data.get("model") or {}).get("unk_token")
    renamable = {
        entry["content"]
        for entry in data.get("added_tokens") or []
        if entry.get("special") and entry.get("content") != unk_token
    }
    free_reserved = [
        content
        for _, content in sorted(
            (entry["id"], entry["content"]) for entry in data.get("added_tokens") or []
        )
        if _RESERVED_TOKEN.fullmatch(content) and content in renamable
    ]
    role_of = {
        BOS_TOKEN: roles.get("bos"), EOS_TOKEN: roles.get("eos"), PAD_TOKEN: roles.get("pad")
    }
    renamed: dict[str, str] = {}
    appended: list[str] = []
    for token in SPECIAL_TOKENS:
        if probe.token_to_id(token) is not None:
            continue
        role_token = role_of.get(token)
        renames_role = (
            role_token in renamable and role_token not in SPECIAL_TOKENS
            and role_token not in renamed
        )
        if renames_role:
            renamed[role_token] = token
            if role_token in free_reserved:
                free_reserved.remove(role_token)
        elif free_reserved:
            renamed[free_reserved.pop(0)] = token
        else:
            appended.append(token)

    for old, new in renamed.items():
        _rename_token(data, old, new)
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    if appended:
        backend.add_special_tokens(
            [tokenizers.AddedToken(token, special=True, normalized=False) for token in appended]
        )
    for old, new in renamed.items():
        logger.info("tokenizer: renamed %s (id %d) to %s", old, backend.token_to_id(new), new)
    for token in appended:
        logger.info("tokenizer: added %s at id %d", token, backend.token_to_id(token))

    tokenizer = Tokenizer(backend, source=f"tokenizer file {path}")
    if tokenizer.vocab_size > vocab_size:
        raise ConversionError(
            f"{path} needs {tokenizer.vocab_size} embedding rows with the jaxllm special tokens "
            f"({', '.join(appended) or 'none'} appended) but the model has vocab_size {vocab_size}"
        )
    return tokenizer


def write_hf_tokenizer(
    tokenizer: Tokenizer, out_dir: str | Path, *, max_seq_len: int
) -> list[Path]:
    """Write tokenizer.json and a tokenizer_config.json that names BOS, EOS and PAD."""
    out_dir = Path(out_dir)
    tokenizer_path = tokenizer.save(out_dir / TOKENIZER_FILE)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    config_path = out_dir / TOKENIZER_CONFIG_FILE
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return [tokenizer_path, config_path]


# --- run directories ------------------------------------------------------------------------


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

