"""Frozen, validated configuration dataclasses and their YAML presets.

A `Config` has one section per concern (model, data, optimizer, train, decode). YAML files map
one to one onto the fields: unknown keys and values of the wrong type raise `ConfigError` naming
the dotted key. Presets are the YAML files in the top-level `configs/` folder, looked up by name.
Command-line overrides are `section.key=value` strings whose value is parsed as YAML, so
`train.steps=200`, `model.rope_scaling=null` and `data.files=[a.txt, b.txt]` all work.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxllm.errors import UserInputError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(UserInputError):
    """A configuration that cannot be used; the message names the key and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (the three-band rule of the Llama 3.1 release).

    Wavelengths shorter than `original_max_seq_len / high_freq_factor` keep their frequency,
    wavelengths longer than `original_max_seq_len / low_freq_factor` are divided by `factor`,
    and the band between interpolates smoothly.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int

    def __post_init__(self):
        _require(self.factor >= 1.0, f"model.rope_scaling.factor must be >= 1, got {self.factor}")
        _require(
            0 < self.low_freq_factor < self.high_freq_factor,
            "model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
            f"{self.low_freq_factor} and {self.high_freq_factor}",
        )
        _require(
            self.original_max_seq_len > 0,
            f"model.rope_scaling.original_max_seq_len must be positive, got {self.original_max_seq_len}",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a Llama 3 decoder. Letters: V vocab, D embed, F mlp, N/K query/kv heads, H head."""

    vocab_size: int
    num_layers: int
    embed_dim: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: RopeScaling | None
    norm_eps: float
    max_seq_len: int
    tie_embeddings: bool
    # Standard deviation of the normal initialiser for every kernel and the embedding.
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "embed_dim", "mlp_dim", "num_heads",
                     "num_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            _require(value > 0, f"model.{name} must be positive, got {value}")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads ({self.num_heads}) must be a multiple of "
            f"model.num_kv_heads ({self.num_kv_heads})",
        )
        _require(self.head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {self.head_dim}")
        _require(self.rope_theta > 0, f"model.rope_theta must be positive, got {self.rope_theta}")
        _require(self.norm_eps > 0, f"model.norm_eps must be positive, got {self.norm_eps}")
        _require(self.init_std > 0, f"model.init_std must be positive, got {self.init_std}")

    @property
    def group_size(self) -> int:
        """G: query heads that share one kv head."""
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count computed from the shapes alone (no allocation)."""
        D, F, V, H = self.embed_dim, self.mlp_dim, self.vocab_size, self.head_dim
        attention = D * self.num_heads * H * 2 + D * self.num_kv_heads * H * 2
        per_layer = attention + 3 * D * F + 2 * D
        head = 0 if self.tie_embeddings else D * V
        return V * D + self.num_layers * per_layer + D + head


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Training text and how it becomes fixed-length token windows."""

    # Text files, globs or JSONL files (one object per line with a `text_field` string).
    # Empty means the built-in Shakespeare corpus.
    files: tuple[str, ...] = ()
    text_field: str = "text"
    # A tokenizer.json to use instead of training a BPE on the corpus.
    tokenizer: str | None = None
    # Fraction of documents (not tokens) held out for validation.
    val_fraction: float = 0.05
    # Tokens per training window; must not exceed model.max_seq_len.
    seq_len: int = 256
    # Cap on characters read per document; 0 reads everything. Used by tests for small slices.
    max_chars_per_doc: int = 0

    def __post_init__(self):
        _require(0.0 < self.val_fraction < 1.0,
                 f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _require(self.seq_len >= 2, f"data.seq_len must be at least 2, got {self.seq_len}")
        _require(self.max_chars_per_doc >= 0,
                 f"data.max_chars_per_doc must be >= 0, got {self.max_chars_per_doc}")
        _require(bool(self.text_field), "data.text_field must not be empty")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with linear warmup, cosine decay to `min_lr_ratio * learning_rate`, and clipping."""

    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0

    def __post_init__(self):
        _require(self.learning_rate > 0,
                 f"optimizer.learning_rate must be positive, got {self.learning_rate}")
        _require(self.warmup_steps >= 0,
                 f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0.0 <= self.min_lr_ratio <= 1.0,
                 f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0,
                 f"optimizer.b1 and optimizer.b2 must be in [0, 1), got {self.b1} and {self.b2}")
        _require(self.grad_clip_norm > 0,
                 f"optimizer.grad_clip_norm must be positive, got {self.grad_clip_norm}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Length, precision, evaluation and checkpoint cadence of a training run."""

    steps: int = 600
    batch_size: int = 16
    # Compute dtype of activations and matmuls; parameters always stay float32.
    compute_dtype: str = "float32"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    # Initial dynamic loss scale for float16 compute (ignored otherwise).
    loss_scale: float = 2.0**15
    # Tokens generated from `sample_prompt` at the end of training; 0 disables the sample.
    sample_tokens: int = 64
    sample_prompt: str = "ROMEO:"

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "eval_every", "eval_batches",
                     "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            _require(value > 0, f"train.{name} must be positive, got {value}")
        _require(self.compute_dtype in COMPUTE_DTYPES,
                 f"train.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                 f"got {self.compute_dtype!r}")
        _require(self.loss_scale >= 1, f"train.loss_scale must be >= 1, got {self.loss_scale}")
        _require(self.sample_tokens >= 0,
                 f"train.sample_tokens must be >= 0, got {self.sample_tokens}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Defaults for sampling; every field can be overridden per call."""

    max_new_tokens: int = 64
    # 0 means greedy decoding.
    temperature: float = 0.8
    # 0 disables top-k filtering.
    top_k: int = 0
    # 1.0 disables nucleus filtering.
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        _require(self.max_new_tokens > 0,
                 f"decode.max_new_tokens must be positive, got {self.max_new_tokens}")
        _require(self.temperature >= 0, f"decode.temperature must be >= 0, got {self.temperature}")
        _require(self.top_k >= 0, f"decode.top_k must be >= 0, got {self.top_k}")
        _require(0.0 < self.top_p <= 1.0, f"decode.top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run: one field per YAML section."""

    model: ModelConfig
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()

    def __post_init__(self):
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len ({self.data.seq_len}) must not exceed model.max_seq_len "
            f"({self.model.max_seq_len})",
        )

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


# --- building dataclasses from plain dicts -------------------------------------------------


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation and convert it (lists to tuples, ints to floats)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            _require(type(None) in options, f"{key} must not be null")
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is tuple:
        _require(isinstance(value, (list, tuple)),
                 f"{key} must be a list, got {type(value).__name__} {value!r}")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        _require(isinstance(value, dict),
                 f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return _build(annotation, value, key)
    if annotation is bool:
        _require(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool),
                 f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        # PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string, so parse it here.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool),
                 f"{key} must be a number, got {value!r}")
        _require(math.isfinite(value), f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        _require(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {_type_name(annotation)} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(f"unknown config key {prefix}.{key}{hint} (valid keys: {valid})")
    missing = [
        name for name, field in fields.items()
        if name not in values
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    _require(not missing, f"missing config key {prefix}.{missing[0] if missing else ''}")
    kwargs = {name: _convert(value, hints[name], f"{prefix}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid {prefix}: {error}") from error


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a `Config` from nested plain values, rejecting unknown keys and wrong types."""
    _require(isinstance(values, dict), f"a config must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(Config)
    fields = {field.name: field for field in dataclasses.fields(Config)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config section {key!r}{hint} "
                              f"(valid sections: {', '.join(fields)})")
    _require("model" in values, "missing config section 'model'")
    sections = {}
    for name, value in values.items():
        section = value if value is not None else {}
        sections[name] = _convert(section, hints[name], name)
    return Config(**sections)


# --- presets, files and overrides ----------------------------------------------------------


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    _require(isinstance(values, dict), f"config file {path} must contain a mapping of sections")
    return values


def load_config_dict(name_or_path: str) -> dict[str, Any]:
    """Read a preset by name (see `configs/`) or a YAML file by path, as plain values."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return _read_yaml(candidate)
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        raise ConfigError(
            f"unknown preset {name_or_path!r}; use one of {', '.join(available_presets())} "
            "or the path of a YAML file"
        )
    return _read_yaml(preset)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (value parsed as YAML) to nested plain values."""
    values = _to_plain(values)
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        _require(bool(sep) and bool(key),
                 f"invalid override {override!r}; write it as section.key=value, "
                 "for example train.steps=200")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or "invalid YAML"
            raise ConfigError(
                f"cannot parse the value of {key} ({raw!r}: {problem}); quote strings that "
                "start with * or contain ': ', for example data.files='[\"*.txt\"]'"
            ) from None
        parts = key.split(".")
        _require(len(parts) >= 2,
                 f"invalid override key {key!r}; name a section and a field, "
                 "for example train.steps=200")
        node = values
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            _require(isinstance(child, dict),
                     f"cannot set {key}: {'.'.join(parts[:depth + 1])} is not a section")
            node[part] = child
            node = child
        node[parts[-1]] = value
    return values


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file, apply `section.key=value` overrides, and validate."""
    values = apply_overrides(load_config_dict(name_or_path), overrides or [])
    return config_from_dict(values)


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def read_config(path: Path) -> Config:
    return config_from_dict(_read_yaml(path))
