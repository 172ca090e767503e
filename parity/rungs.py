"""The parity ladder: each rung runs one piece of jaxllm and its reference on the same inputs.

A rung is a function `(ctx: RungContext) -> (actual, desired)` registered with `@rung(name)`.
`actual` comes from jaxllm and `desired` from torchref, except in the cache-consistency rungs,
which compare one framework's cached decoding with its own full forward. Outputs are arrays or dicts
of arrays. The part of a name before "/" selects the tolerance in `parity.tolerances`, so
`attention/kv=1` and `attention/kv=4` share the `attention` entry.

To add a rung, write the function here, decorate it, and add its tolerance entry.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import torchref
import torchref.model as torch_model
from jaxllm.config import OptimizerConfig, RopeScaling
from jaxllm.convert.layout import from_hf_state_dict, to_hf_state_dict
from jaxllm.generate import generate
from jaxllm.kv_cache import KVCache
from jaxllm.losses import cross_entropy
from jaxllm.model import (
    MLP,
    Attention,
    Block,
    RMSNorm,
    apply_rope,
    forward,
    rope_angles,
    rope_inverse_frequencies,
)
from jaxllm.train.optim import NO_DECAY_NAMES, make_optimizer
from parity.harness import (
    DTYPES,
    Comparison,
    RungContext,
    compare,
    left_padded_mask,
    make_models,
    model_values,
    positions_for,
    random_tokens,
    to_numpy,
)
from parity.tolerances import tolerance

RungOutput = tuple[Any, Any]


@dataclasses.dataclass(frozen=True)
class Rung:
    """A registered rung: its name, the function and the dtypes it runs in."""

    name: str
    run: Callable[[RungContext], RungOutput]
    dtypes: tuple[str, ...]
    summary: str

    @property
    def tolerance_key(self) -> str:
        return self.name.split("/")[0]


RUNGS: dict[str, Rung] = {}


def rung(name: str, *, dtypes: tuple[str, ...] = DTYPES, **kwargs: Any):
    """Register the decorated function as rung `name`, called with `kwargs` as keyword arguments.

    Decorators stack, so one function can serve several cases of a rung. Stacked decorators
    run from the bottom up, so the bottom line is the first case in the ladder's order.
    """

    def register(function):
        if name in RUNGS:
            raise ValueError(f"rung {name!r} is registered twice")
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else name
        RUNGS[name] = Rung(name, functools.partial(function, **kwargs), dtypes, summary)
        return function

    return register


# Batch, sequence length and chunking shared by the rungs.
BATCH = 2
SEQ_LEN = 24
# Chunk sizes of chunked cached decoding; they sum to SEQ_LEN and mix prefill and single steps.
CHUNKS = (7, 1, 5, 1, 1, 9)
# Prompt lengths of the left-padded batch; the longest sets the padded length.
PADDED_LENGTHS = (20, 13, 5)
NEW_TOKENS = 8
# The Llama 3.2 1B RoPE settings (configs/llama3.2-1b.yaml), checked at every position.
LONG_ROPE = {
    "head_dim": 64,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_seq_len": 8192,
    },
    "max_seq_len": 131072,
}


@functools.cache
def _jit_forward(config, compute_dtype):
    """Return one jitted forward per config and dtype, so that rungs share compilations."""
    return jax.jit(functools.partial(forward, config=config, compute_dtype=compute_dtype))


def _causal_inputs(ctx: RungContext, config, offset: int = 0):
    """Draw activations x [B, T, D]; return them with positions and the causal mask [B, T, T]."""
    x = ctx.rng(offset).standard_normal((BATCH, SEQ_LEN, config.embed_dim)).astype(np.float32)
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN))
    allowed = np.broadcast_to(np.tril(np.ones((SEQ_LEN, SEQ_LEN), bool)), (BATCH, SEQ_LEN, SEQ_LEN))
    return x, positions, allowed


def _jax_angles(config, positions, ctx):
    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    return rope_angles(ctx.to_jax(positions), inv_freq)


def _torch_angles(pair, positions, ctx):
    inv_freq = torchref.rope_inverse_frequencies(pair.torch_config, ctx.torch_device)
    return torch_model.rope_cos_sin(ctx.to_torch(positions), inv_freq)


# --- layers ---------------------------------------------------------------------------------


@rung("rmsnorm")
def rmsnorm(ctx: RungContext) -> RungOutput:
    """RMSNorm of activations with scale 3 and offset 1, with the first layer's norm weight."""
    pair = make_models(ctx, num_layers=1)
    x = ctx.rng().standard_normal((BATCH, SEQ_LEN, pair.config.embed_dim)).astype(np.float32)
    x = 3.0 * x + 1.0
    norm = RMSNorm(pair.config.norm_eps, ctx.jax_dtype)
    actual = norm.apply({"params": pair.layer()["attn_norm"]}, ctx.to_jax(x))
    with torch.no_grad():
        desired = pair.torch_model.model.layers[0].input_layernorm(ctx.to_torch(x))
    return to_numpy(actual), to_numpy(desired)


def _rope_values(setting: str) -> dict[str, Any]:
    """Model values of a RoPE setting: "plain", "llama3.1" (the test model) or "llama3.2-1b"."""
    if setting == "plain":
        return model_values(rope_scaling=None)
    if setting == "llama3.1":
        return model_values()
    return model_values(**LONG_ROPE)


def _scaling(values: dict[str, Any]) -> RopeScaling | None:
    scaling = values["rope_scaling"]
    return None if scaling is None else RopeScaling(**scaling)


@rung("rope_freqs/llama3.2-1b", dtypes=("float32",), setting="llama3.2-1b")
@rung("rope_freqs/llama3.1", dtypes=("float32",), setting="llama3.1")
@rung("rope_freqs/plain", dtypes=("float32",), setting="plain")
def rope_freqs(ctx: RungContext, *, setting: str) -> RungOutput:
    """RoPE inverse frequencies (float32 in every compute dtype), plain or Llama 3.1 scaled."""
    values = _rope_values(setting)
    actual = rope_inverse_frequencies(values["head_dim"], values["rope_theta"], _scaling(values))
    torch_config = torchref.LlamaConfig.from_dict(values)
    desired = torchref.rope_inverse_frequencies(torch_config, ctx.torch_device)
    return actual, to_numpy(desired)


@rung("rope/llama3.2-1b", setting="llama3.2-1b")
@rung("rope/llama3.1", setting="llama3.1")
@rung("rope/plain", setting="plain")
def rope(ctx: RungContext, *, setting: str) -> RungOutput:
    """Rotated activations [1, T, heads, H] at every position 0..max_seq_len-1.

    The llama3.2-1b case runs to position 131071 and gives both sides jaxllm's inverse
    frequencies. Its own frequencies differ from torchref's by one or two float32 ulps in a
    few bands, because numpy and torch round float32 pow differently (the rope_freqs rungs).
    One ulp of a frequency near 1 moves the angle at position 1e5 by about 5e-3 rad, and that
    rounding would hide the rotation itself.
    """
    values = _rope_values(setting)
    long = setting == "llama3.2-1b"
    T, H = values["max_seq_len"], values["head_dim"]
    heads = 1 if long else values["num_heads"]
    x = ctx.rng().standard_normal((1, T, heads, H)).astype(np.float32)
    positions = np.arange(T, dtype=np.int32)[None, :]

    jax_inv = rope_inverse_frequencies(H, values["rope_theta"], _scaling(values))
    cos, sin = rope_angles(ctx.to_jax(positions), jax_inv)
    actual = apply_rope(ctx.to_jax(x), cos, sin)

    torch_config = torchref.LlamaConfig.from_dict(values)
    torch_inv = torchref.rope_inverse_frequencies(torch_config, ctx.torch_device)
    if long:
        torch_inv = torch.from_numpy(jax_inv).to(ctx.torch_device)
    torch_cos, torch_sin = torch_model.rope_cos_sin(ctx.to_torch(positions), torch_inv)
    desired = torchref.apply_rope(ctx.to_torch(x), torch_cos, torch_sin)
    return to_numpy(actual), to_numpy(desired)


@rung("attention/kv=4", num_kv_heads=4)
@rung("attention/kv=2", num_kv_heads=2)
@rung("attention/kv=1", num_kv_heads=1)
def attention(ctx: RungContext, *, num_kv_heads: int) -> RungOutput:
    """Causal grouped-query attention of one layer, 4 query heads over 1, 2 or 4 kv heads."""
    pair = make_models(ctx, num_layers=1, num_kv_heads=num_kv_heads)
    x, positions, allowed = _causal_inputs(ctx, pair.config)
    cos, sin = _jax_angles(pair.config, positions, ctx)
    module = Attention(pair.config, ctx.jax_dtype)
    actual, _ = module.apply(
        {"params": pair.layer()["attn"]}, ctx.to_jax(x), cos, sin, ctx.to_jax(allowed)
    )
    torch_cos, torch_sin = _torch_angles(pair, positions, ctx)
    with torch.no_grad():
        desired = pair.torch_model.model.layers[0].self_attn(
            ctx.to_torch(x), torch_cos, torch_sin, ctx.to_torch(allowed)
        )
    return to_numpy(actual), to_numpy(desired)


@rung("mlp")
def mlp(ctx: RungContext) -> RungOutput:
    """SwiGLU MLP of one layer."""
    pair = make_models(ctx, num_layers=1)
    x, _, _ = _causal_inputs(ctx, pair.config)
    actual = MLP(pair.config, ctx.jax_dtype).apply({"params": pair.layer()["mlp"]}, ctx.to_jax(x))
    with torch.no_grad():
        desired = pair.torch_model.model.layers[0].mlp(ctx.to_torch(x))
    return to_numpy(actual), to_numpy(desired)


@rung("block")
def block(ctx: RungContext) -> RungOutput:
    """Run one decoder layer: both norms, attention, MLP and the residual additions."""
    pair = make_models(ctx, num_layers=1)
    x, positions, allowed = _causal_inputs(ctx, pair.config)
    cos, sin = _jax_angles(pair.config, positions, ctx)
    module = Block(pair.config, ctx.jax_dtype)
    actual, _ = module.apply({"params": pair.layer()}, ctx.to_jax(x), cos, sin, ctx.to_jax(allowed))
    torch_cos, torch_sin = _torch_angles(pair, positions, ctx)
    with torch.no_grad():
        desired = pair.torch_model.model.layers[0](
            ctx.to_torch(x), torch_cos, torch_sin, ctx.to_torch(allowed)
        )
    return to_numpy(actual), to_numpy(desired)


# --- whole model ----------------------------------------------------------------------------


@rung("logits/tied", tie_embeddings=True)
@rung("logits/untied", tie_embeddings=False)
def logits(ctx: RungContext, *, tie_embeddings: bool) -> RungOutput:
    """Compute the full model's logits for a [2, 24] batch, with a tied or an untied LM head."""
    pair = make_models(ctx, tie_embeddings=tie_embeddings)
    tokens = random_tokens(ctx, pair.config, (BATCH, SEQ_LEN))
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), tokens.shape)
    actual, _ = _jit_forward(pair.config, ctx.jax_dtype)(
        pair.params, ctx.to_jax(tokens), ctx.to_jax(positions)
    )
    with torch.no_grad():
        desired, _ = pair.torch_model(ctx.to_torch(tokens).long(), ctx.to_torch(positions).long())
    return to_numpy(actual), to_numpy(desired)


def _chunk_bounds(chunked: bool, length: int) -> list[tuple[int, int]]:
    sizes = CHUNKS if chunked else (1,) * length
    assert sum(sizes) == length, "chunk sizes must cover the sequence"
    ends = np.cumsum(sizes)
    return [(int(end - size), int(end)) for size, end in zip(sizes, ends)]


def _jax_cached(pair, ctx, tokens, positions, mask, bounds, total):
    """Feed `tokens` through a jaxllm KVCache chunk by chunk; return the logits [B, T, V]."""
    run = _jit_forward(pair.config, ctx.jax_dtype)
    cache = KVCache.allocate(pair.config, tokens.shape[0], total, ctx.jax_dtype)
    outputs = []
    for start, end in bounds:
        out, cache = run(
            pair.params, ctx.to_jax(tokens[:, start:end]), ctx.to_jax(positions[:, start:end]),
            mask=ctx.to_jax(mask[:, start:end]), cache=cache,
        )
        outputs.append(to_numpy(out))
    return np.concatenate(outputs, axis=1)


def _torch_cached(pair, ctx, tokens, positions, mask, bounds, total):
    """Feed `tokens` through a torchref KVCache chunk by chunk; return the logits [B, T, V]."""
    cache = torchref.KVCache.allocate(
        pair.torch_config, tokens.shape[0], total, ctx.torch_dtype, ctx.torch_device
    )
    outputs = []
    with torch.no_grad():
        for start, end in bounds:
            out, cache = pair.torch_model(
                ctx.to_torch(tokens[:, start:end]).long(),
                ctx.to_torch(positions[:, start:end]).long(),
                ctx.to_torch(mask[:, start:end]),
                cache,
            )
            outputs.append(to_numpy(out))
    return np.concatenate(outputs, axis=1)


def _full_inputs(ctx, config):
    tokens = random_tokens(ctx, config, (BATCH, SEQ_LEN))
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), tokens.shape)
    return tokens, positions, np.ones(tokens.shape, bool)


@rung("decode/chunks", chunked=True)
@rung("decode/step", chunked=False)
def decode(ctx: RungContext, *, chunked: bool) -> RungOutput:
    """Cached decoding one token at a time, or in chunks of 7, 1, 5, 1, 1, 9: jaxllm vs torchref."""
    pair = make_models(ctx)
    tokens, positions, mask = _full_inputs(ctx, pair.config)
    bounds = _chunk_bounds(chunked, SEQ_LEN)
    actual = _jax_cached(pair, ctx, tokens, positions, mask, bounds, SEQ_LEN)
    desired = _torch_cached(pair, ctx, tokens, positions, mask, bounds, SEQ_LEN)
    return actual, desired


@rung("cache_consistency/torch-chunks", framework="torch", chunked=True)
@rung("cache_consistency/torch-step", framework="torch", chunked=False)
@rung("cache_consistency/jax-chunks", framework="jax", chunked=True)
@rung("cache_consistency/jax-step", framework="jax", chunked=False)
def cache_consistency(ctx: RungContext, *, framework: str, chunked: bool) -> RungOutput:
    """Compare one framework's cached decoding with its own full forward over the same tokens."""
    pair = make_models(ctx)
    tokens, positions, mask = _full_inputs(ctx, pair.config)
    bounds = _chunk_bounds(chunked, SEQ_LEN)
    if framework == "jax":
        cached = _jax_cached(pair, ctx, tokens, positions, mask, bounds, SEQ_LEN)
        run = _jit_forward(pair.config, ctx.jax_dtype)
        full, _ = run(pair.params, ctx.to_jax(tokens), ctx.to_jax(positions))
        return cached, to_numpy(full)
    cached = _torch_cached(pair, ctx, tokens, positions, mask, bounds, SEQ_LEN)
    with torch.no_grad():
        full, _ = pair.torch_model(ctx.to_torch(tokens).long(), ctx.to_torch(positions).long())
    return cached, to_numpy(full)


def _left_padded_batch(ctx, config):
    total = max(PADDED_LENGTHS)
    mask = left_padded_mask(list(PADDED_LENGTHS), total)
    tokens = np.where(mask, random_tokens(ctx, config, mask.shape), 0).astype(np.int32)
    return tokens, positions_for(mask), mask


@rung("left_padded/forward")
def left_padded_forward(ctx: RungContext) -> RungOutput:
    """Full forward of a left-padded batch (lengths 20, 13, 5); logits at real tokens only."""
    pair = make_models(ctx)
    tokens, positions, mask = _left_padded_batch(ctx, pair.config)
    actual, _ = _jit_forward(pair.config, ctx.jax_dtype)(
        pair.params, ctx.to_jax(tokens), ctx.to_jax(positions), mask=ctx.to_jax(mask)
    )
    with torch.no_grad():
        desired, _ = pair.torch_model(
            ctx.to_torch(tokens).long(), ctx.to_torch(positions).long(), ctx.to_torch(mask)
        )
    return to_numpy(actual)[mask], to_numpy(desired)[mask]


@rung("left_padded/decode")
def left_padded_decode(ctx: RungContext) -> RungOutput:
    """Prefill a left-padded batch into a cache, then decode 8 tokens at per-row positions."""
    pair = make_models(ctx)
    prompt, prompt_positions, prompt_mask = _left_padded_batch(ctx, pair.config)
    continuation = random_tokens(ctx, pair.config, (prompt.shape[0], NEW_TOKENS), offset=1)
    lengths = prompt_mask.sum(axis=1, keepdims=True)
    tokens = np.concatenate([prompt, continuation], axis=1)
    new_positions = lengths + np.arange(NEW_TOKENS)
    positions = np.concatenate([prompt_positions, new_positions], axis=1).astype(np.int32)
    mask = np.concatenate([prompt_mask, np.ones(continuation.shape, bool)], axis=1)
    T = prompt.shape[1]
    bounds = [(0, T)] + [(T + step, T + step + 1) for step in range(NEW_TOKENS)]
    total = tokens.shape[1]
    actual = _jax_cached(pair, ctx, tokens, positions, mask, bounds, total)
    desired = _torch_cached(pair, ctx, tokens, positions, mask, bounds, total)
    return actual[mask], desired[mask]


@rung("greedy", dtypes=("float32",))
def greedy(ctx: RungContext) -> RungOutput:
    """Greedy tokens from a left-padded batch: jaxllm.generate against torchref.greedy_generate."""
    pair = make_models(ctx)
    tokens, _, mask = _left_padded_batch(ctx, pair.config)
    output = generate(
        pair.params, ctx.to_jax(tokens), ctx.to_jax(mask), jax.random.key(ctx.seed),
        config=pair.config, max_new_tokens=NEW_TOKENS * 2, temperature=0.0, top_k=0, top_p=1.0,
        stop_ids=jnp.zeros((0,), jnp.int32), pad_id=0, compute_dtype=ctx.jax_dtype,
    )
    desired = torchref.greedy_generate(
        pair.torch_model, ctx.to_torch(tokens).long(), ctx.to_torch(mask), NEW_TOKENS * 2
    )
    return to_numpy(output.tokens).astype(np.int64), to_numpy(desired)


# --- training -------------------------------------------------------------------------------


def _loss_batch(ctx, config):
    """Inputs, targets, positions and a target mask that skips a 6-token prompt in row 0."""
    windows = random_tokens(ctx, config, (BATCH, SEQ_LEN + 1))
    inputs, targets = windows[:, :-1], windows[:, 1:]
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), inputs.shape)
    mask = np.ones(inputs.shape, bool)
    mask[0, :6] = False
    return inputs, targets, positions, mask


def _jax_loss_and_grads(pair, ctx, params, batch):
    inputs, targets, positions, mask = (ctx.to_jax(part) for part in batch)

    def loss_fn(params):
        logits, _ = forward(
            params, inputs, positions, config=pair.config, compute_dtype=ctx.jax_dtype
        )
        return cross_entropy(logits, targets, mask)[0]

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def _torch_loss(pair, ctx, batch):
    inputs, targets, positions, mask = batch
    logits, _ = pair.torch_model(ctx.to_torch(inputs).long(), ctx.to_torch(positions).long())
    return torchref.cross_entropy(logits, ctx.to_torch(targets).long(), ctx.to_torch(mask))


def _torch_grads(model) -> dict[str, np.ndarray]:
    return {name: to_numpy(param.grad) for name, param in model.named_parameters()}


@functools.cache
def _loss_outputs(ctx: RungContext) -> dict[str, Any]:
    """Loss and gradients on both sides, computed once per context for the loss and grads rungs."""
    pair = make_models(ctx, tie_embeddings=True)
    batch = _loss_batch(ctx, pair.config)
    value, grads = _jax_loss_and_grads(pair, ctx, pair.params, batch)
    pair.torch_model.zero_grad()
    torch_value = _torch_loss(pair, ctx, batch)
    torch_value.backward()
    return {
        "jax_loss": to_numpy(value),
        "torch_loss": to_numpy(torch_value),
        "jax_grads": to_hf_state_dict(jax.tree.map(to_numpy, grads), pair.config),
        "torch_grads": _torch_grads(pair.torch_model),
    }


@rung("grads", output="grads")
@rung("loss", output="loss")
def loss(ctx: RungContext, *, output: str) -> RungOutput:
    """Masked next-token cross-entropy and its gradients w.r.t. every parameter (tied head)."""
    outputs = _loss_outputs(ctx)
    return outputs[f"jax_{output}"], outputs[f"torch_{output}"]


# AdamW hyperparameters of the optimizer rung. The clip norm is far below the gradient norm of
# the test model (about 5 at init), so clipping scales every gradient.
ADAMW = OptimizerConfig(
    learning_rate=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.25
)
ADAMW_STEPS = 2


def _decays(hf_name: str) -> bool:
    """Return jaxllm's weight-decay mask for a Hugging Face name (False: norms, embedding)."""
    no_decay = hf_name.endswith("norm.weight") or hf_name == "model.embed_tokens.weight"
    assert NO_DECAY_NAMES == {"scale", "embedding"}, "update _decays to match jaxllm.train.optim"
    return not no_decay


@rung("adamw", dtypes=("float32",))
def adamw(ctx: RungContext) -> RungOutput:
    """Run two steps of jaxllm's optimizer (clip_by_global_norm, AdamW) and of torch's.

    torch's side is torch.nn.utils.clip_grad_norm_ then torch.optim.AdamW.

    Both optimizers get the same gradients: torchref's gradients of the real model and loss,
    recomputed at torchref's parameters after the first step. Each framework's own gradients
    differ by float32 rounding (the grads rung), and Adam's g / (|g| + eps) magnifies that
    rounding for elements with |g| near eps, which would hide the optimizer's own arithmetic.
    Weight decay skips norms and the embedding on both sides. Output: the parameters after the
    second step.
    """
    pair = make_models(ctx, tie_embeddings=False)
    batch = _loss_batch(ctx, pair.config)
    named = dict(pair.torch_model.named_parameters())
    groups = [
        {"params": [p for n, p in named.items() if _decays(n)], "weight_decay": ADAMW.weight_decay},
        {"params": [p for n, p in named.items() if not _decays(n)], "weight_decay": 0.0},
    ]
    torch_optimizer = torch.optim.AdamW(
        groups, lr=ADAMW.learning_rate, betas=(ADAMW.b1, ADAMW.b2), eps=ADAMW.eps
    )
    optimizer = make_optimizer(ADAMW, learning_rate=ADAMW.learning_rate)
    update = jax.jit(optimizer.update)
    params = pair.params
    opt_state = optimizer.init(params)
    for _ in range(ADAMW_STEPS):
        torch_optimizer.zero_grad()
        _torch_loss(pair, ctx, batch).backward()
        torch_grads = from_hf_state_dict(_torch_grads(pair.torch_model), pair.config)
        grads = jax.tree.map(jnp.asarray, torch_grads)
        grad_norm = float(optax.tree.norm(grads))
        assert grad_norm > ADAMW.grad_clip_norm, f"clipping inactive: gradient norm {grad_norm}"
        torch.nn.utils.clip_grad_norm_(pair.torch_model.parameters(), ADAMW.grad_clip_norm)
        torch_optimizer.step()
        updates, opt_state = update(grads, opt_state, params)
        params = jax.jit(optax.apply_updates)(params, updates)

    actual = to_hf_state_dict(jax.tree.map(to_numpy, params), pair.config)
    desired = {name: to_numpy(param) for name, param in pair.torch_model.named_parameters()}
    return actual, desired


def run_rung(name: str, dtype: str, device: str) -> Comparison:
    """Run one rung on `device` ("cpu" or "gpu") in `dtype` and compare within its tolerance."""
    entry = RUNGS[name]
    if dtype not in entry.dtypes:
        raise ValueError(
            f"rung {name} does not run in {dtype}; it runs in {', '.join(entry.dtypes)}"
        )
    limits = tolerance(entry.tolerance_key, dtype)
    ctx = RungContext(device=device, dtype=dtype)
    with jax.default_device(ctx.jax_device):
        actual, desired = entry.run(ctx)
    label = f"{name} [{dtype}, {device}]"
    return compare(label, actual, desired, atol=limits.atol, rtol=limits.rtol)
