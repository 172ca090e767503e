"""Eager PyTorch Llama 3: forward pass, weight init, KV cache and greedy decoding.

This model is the reference that the JAX model is tested against, so every step is
written out plainly. Parameter names and layouts match Hugging Face
``LlamaForCausalLM``, so its state_dict loads without renaming. The numerics follow
the Hugging Face eager path (transformers 5.25): RMSNorm and RoPE angles in float32,
attention softmax in float32. Unlike Hugging Face, the logits are returned in float32.

Dimension letters: B batch, T query length, S key (cache) length, D embed, F mlp,
N query heads, K kv heads, G = N / K group size, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchref.config import LlamaConfig


# ----------------------------------------------------------------------------- RoPE


def rope_inverse_frequencies(config: LlamaConfig, device: torch.device | None = None) -> Tensor:
    """Return the RoPE inverse frequencies [H/2] in float32.

    Frequency j is ``rope_theta ** (-2j / H)``. When ``config.rope_scaling`` is set,
    the frequencies are rescaled by ``scale_llama31_frequencies``.
    """
    exponents = torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_scaling is None:
        return inv_freq
    return scale_llama31_frequencies(inv_freq, **config.rope_scaling)


def scale_llama31_frequencies(
    inv_freq: Tensor,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_seq_len: int,
) -> Tensor:
    """Apply the Llama 3.1 three-band RoPE frequency scaling.

    With wavelength ``w = 2 * pi / freq`` and ``orig = original_max_seq_len``:

    - ``w < orig / high_freq_factor`` (high frequencies): ``freq`` is kept.
    - ``w > orig / low_freq_factor`` (low frequencies): ``freq / factor``.
    - otherwise: ``(1 - s) * freq / factor + s * freq`` with
      ``s = (orig / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``.

    This is the rule that transformers 5.25 implements as rope_type "llama3"
    (``_compute_llama3_parameters`` in ``modeling_rope_utils.py``).
    """
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq

    scaled = torch.where(wavelen < original_max_seq_len / high_freq_factor, inv_freq, interpolated)
    return torch.where(wavelen > original_max_seq_len / low_freq_factor, inv_freq / factor, scaled)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """Return cos and sin of the rotation angles, each [B, T, H/2] in float32."""
    angles = positions.float()[..., None] * inv_freq  # [B, T, H/2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, heads, H] in the rotate-half layout.

    Feature j of the first half pairs with feature j of the second half. As in Hugging
    Face, cos and sin are cast to x's dtype before the rotation.
    """
    cos = cos[:, :, None, :].to(x.dtype)
    sin = sin[:, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """RMS normalization over the last axis with a learned scale.

    The statistic is computed in float32. The normalized value is cast back to the
    input dtype before the multiply by ``weight`` (the Hugging Face order).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        D, N, K, H = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(D, N * H, bias=False)
        self.k_proj = nn.Linear(D, K * H, bias=False)
        self.v_proj = nn.Linear(D, K * H, bias=False)
        self.o_proj = nn.Linear(N * H, D, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        allowed: Tensor,
        cache_slots: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
    ) -> Tensor:
        """Attend x [B, T, D] to itself, or to the cache when ``cache_slots`` is given.

        ``allowed`` [B, T, S] is True where a query may read a key. ``cache_slots`` are
        this layer's cache keys and values [B, S, K, H]. The new keys and values are
        written into them in place at slots [start, start + T).
        """
        B, T, _ = x.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim

        q = apply_rope(self.q_proj(x).view(B, T, N, H), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, K, H), cos, sin)
        v = self.v_proj(x).view(B, T, K, H)
        if cache_slots is not None:
            cache_keys, cache_values = cache_slots
            cache_keys[:, start:start + T] = k
            cache_values[:, start:start + T] = v
            k, v = cache_keys, cache_values

        # repeat_interleave makes query head n read kv head n // G.
        G = N // K
        k = k.repeat_interleave(G, dim=2)  # [B, S, N, H]
        v = v.repeat_interleave(G, dim=2)

        # Scores use float32 copies of q and k. Hugging Face multiplies in the model dtype,
        # so in bfloat16 the two models differ slightly here.
        scores = torch.einsum("btnh,bsnh->bnts", q.float(), k.float()) * H**-0.5
        # A query row with no allowed key gets equal scores everywhere, so the softmax
        # stays finite (uniform) where a -inf fill would give NaN.
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1).to(v.dtype)
        out = torch.einsum("bnts,bsnh->btnh", probs, v).reshape(B, T, N * H)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.embed_dim, config.mlp_dim, bias=False)
        self.up_proj = nn.Linear(config.embed_dim, config.mlp_dim, bias=False)
        self.down_proj = nn.Linear(config.mlp_dim, config.embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, allowed, cache_slots=None, start=0) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache_slots, start)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Token embedding, the L decoder layers and the final norm.

    It is stored as ``Llama.model`` so that parameter names start with ``model.`` as in
    Hugging Face checkpoints.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)


# ----------------------------------------------------------------------------- cache


@dataclass
class KVCache:
    """Preallocated per-layer keys and values, filled left to right.

    ``keys[i]`` and ``values[i]`` [B, S, K, H] belong to layer i. ``key_mask`` [B, S] is
    True where a slot contains a real token. ``index`` is the next slot to write. Slots at
    or after it are unwritten, and the causal mask hides them. The cache is updated in
    place, so it is meant for inference under ``torch.no_grad()``.
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor
    index: int = 0

    @classmethod
    def allocate(
        cls,
        config: LlamaConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Allocate a zeroed cache for ``batch`` rows of up to ``max_len`` tokens each."""
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
            key_mask=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]


# ----------------------------------------------------------------------------- model


class Llama(nn.Module):
    """Llama 3 causal language model with Hugging Face parameter names.

    With ``tie_embeddings`` the output head reuses ``model.embed_tokens.weight`` and the
    state_dict has no ``lm_head.weight``. ``seed`` draws the weights with
    ``init_weights``. Pass ``seed=None`` to skip that when a state_dict will be loaded
    anyway, which leaves PyTorch's default module init.
    """

    def __init__(self, config: LlamaConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        if seed is not None:
            init_weights(self, seed)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """Return float32 logits [B, T, V] for tokens [B, T], and the cache.

        ``mask`` [B, T] bool is True for real tokens and False for padding. It defaults
        to all True. ``positions`` [B, T] are the RoPE positions. They default to
        ``cache.index + arange(T)`` (``arange(T)`` without a cache), so left-padded rows
        need explicit per-row positions. A query at slot t attends to key slots s <= t
        whose token is real. With a cache, the new keys and values go to slots
        [index, index + T), the queries attend over all S slots, and ``cache.index``
        advances by T. The returned cache is the same object, updated in place.
        """
        B, T = tokens.shape
        device = tokens.device
        start = 0 if cache is None else cache.index
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
        if positions is None:
            positions = (start + torch.arange(T, device=device)).expand(B, T)
        if mask.dtype != torch.bool or mask.shape != (B, T):
            raise ValueError(f"mask must be a bool tensor of shape {(B, T)}, got {mask.dtype} {tuple(mask.shape)}")
        if positions.shape != (B, T):
            raise ValueError(f"positions must have shape {(B, T)}, got {tuple(positions.shape)}")

        if cache is None:
            key_mask = mask  # [B, S] with S = T
        else:
            if start + T > cache.max_len:
                raise ValueError(
                    f"KV cache is full: {T} new tokens at index {start} exceed max_len {cache.max_len}. "
                    f"Allocate a cache with max_len >= {start + T}."
                )
            cache.key_mask[:, start:start + T] = mask
            key_mask = cache.key_mask
        query_slots = start + torch.arange(T, device=device)
        key_slots = torch.arange(key_mask.shape[1], device=device)
        causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
        allowed = causal[None] & key_mask[:, None, :]  # [B, T, S]

        cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(self.config, device))
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            cache_slots = None if cache is None else (cache.keys[i], cache.values[i])
            h = layer(h, cos, sin, allowed, cache_slots, start)
        h = self.model.norm(h)

        # The head matmul runs in the weight dtype as in Hugging Face. Only its output is cast to float32.
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, head).float()
        if cache is not None:
            cache.index += T
        return logits, cache


def init_weights(model: Llama, seed: int) -> None:
    """Draw linear and embedding weights from normal(0, init_std) and set norm weights to 1.

    The draws come from a CPU generator seeded with ``seed`` in ``model.modules()``
    order, so the weights do not depend on the model's device.
    """
    generator = torch.Generator().manual_seed(seed)
    std = model.config.init_std
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                sample = torch.normal(0.0, std, size=tuple(module.weight.shape), generator=generator)
                module.weight.copy_(sample)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)


# ----------------------------------------------------------------------------- decoding


@torch.no_grad()
def greedy_generate(
    model: Llama,
    tokens: Tensor,
    mask: Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
) -> Tensor:
    """Decode greedily from left-padded prompts and return the new tokens [B, max_new_tokens].

    ``tokens`` and ``mask`` are [B, T], with padding on the left marked False in
    ``mask``. The prompt is prefilled into a KV cache, then one token per step is fed
    back. Prompt positions are ``cumsum(mask) - 1`` clipped at 0, and new tokens
    continue from each row's real length. Once a row emits ``eos_id`` it emits
    ``eos_id`` at every later step. Ties in the argmax go to the lowest token id.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = tokens.shape
    device = tokens.device
    if max_new_tokens == 0:
        return torch.empty(B, 0, dtype=torch.long, device=device)

    dtype = next(model.parameters()).dtype
    cache = KVCache.allocate(model.config, B, T + max_new_tokens, dtype, device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    lengths = mask.long().sum(-1)  # [B], the position of each row's first new token
    logits, cache = model(tokens, positions, mask, cache)

    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_mask = torch.ones(B, 1, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(dim=-1)
        if eos_id is not None:
            next_token = torch.where(done, eos_id, next_token)
            done |= next_token == eos_id
        new_tokens.append(next_token)
        if step + 1 < max_new_tokens:
            step_positions = (lengths + step)[:, None]
            logits, cache = model(next_token[:, None], step_positions, step_mask, cache)
    return torch.stack(new_tokens, dim=1)
