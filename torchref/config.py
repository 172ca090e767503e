"""Model hyperparameters for the PyTorch reference Llama.

The field names match the JAX model's config so that one ``model:`` section of a
YAML file can build both models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROPE_SCALING_KEYS = frozenset(
    {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
)


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama 3 architecture hyperparameters.

    ``rope_scaling`` is None for plain RoPE, or a dict with the keys ``factor``,
    ``low_freq_factor``, ``high_freq_factor`` and ``original_max_seq_len`` that
    turns on the Llama 3.1 frequency scaling (see ``torchref.model.rope_inverse_frequencies``).
    The instance is frozen, but the ``rope_scaling`` dict itself is a plain dict,
    so the config is not hashable.
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict[str, float] | None
    norm_eps: float
    max_seq_len: int
    tie_embeddings: bool
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "embed_dim", "mlp_dim", "num_heads",
                     "num_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)
            # Copy so that later edits to the caller's dict cannot change this config.
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LlamaConfig:
        """Build a config from a plain dict, such as the ``model:`` section of a YAML file.

        Raises ValueError on an unknown or missing key. Float fields accept ints and
        numeric strings, because YAML 1.1 reads ``1e-5`` (no dot) as a string.
        """
        fields = {field.name: field for field in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                raise ValueError(
                    f"unknown LlamaConfig key {key!r}. Valid keys are {sorted(fields)}."
                )
        required = [
            name for name, field in fields.items()
            if field.default is dataclasses.MISSING and name not in values
        ]
        if required:
            raise ValueError(f"missing LlamaConfig keys: {required}")

        kwargs = dict(values)
        for name in ("rope_theta", "norm_eps", "init_std"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        return cls(**kwargs)


def _validate_rope_scaling(rope_scaling: dict[str, float]) -> None:
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be None or a dict, got {rope_scaling!r}")
    unknown = sorted(set(rope_scaling) - ROPE_SCALING_KEYS)
    missing = sorted(ROPE_SCALING_KEYS - set(rope_scaling))
    if unknown:
        raise ValueError(f"unknown rope_scaling keys {unknown}. Valid keys are {sorted(ROPE_SCALING_KEYS)}.")
    if missing:
        raise ValueError(f"missing rope_scaling keys {missing}")
    if rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]:
        raise ValueError(
            "rope_scaling high_freq_factor must be greater than low_freq_factor, got "
            f"{rope_scaling['high_freq_factor']} and {rope_scaling['low_freq_factor']}"
        )
