"""Tolerances of the parity ladder: one entry per rung and dtype, each with its reason.

An element passes when |actual - desired| <= atol + rtol * |desired|. The key of a rung is the
part of its name before "/". float32 entries allow only the rounding of float32 arithmetic done
in another order, because XLA and PyTorch block, fuse and sum differently. Each is a few times
the difference measured on CPU (docs/parity.md). A real mismatch of the math moves values by
orders of magnitude more, so it fails. The test model's activations and logits are of order 1.

bfloat16 entries are looser because jaxllm and torchref round to bfloat16 at different points;
each reason names them. A bfloat16 ulp is 2^-8 of the value (0.0039 near 1, 0.031 near 4 to 8).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str


# bfloat16 rounding points shared by several reasons below.
_BF16_NORM = (
    "torchref rounds the normalised value to bfloat16 before the weight multiply (the Hugging "
    "Face order), jaxllm multiplies in float32 and rounds once"
)
_BF16_HEAD = "jaxllm runs the final norm and the LM head in float32, torchref in bfloat16"

TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("rmsnorm", "float32"): Tolerance(
        atol=2e-6, rtol=0.0,
        reason="same formula; rsqrt and the mean over D round differently in the last bit",
    ),
    ("rmsnorm", "bfloat16"): Tolerance(
        atol=4e-2, rtol=1e-2,
        reason=f"{_BF16_NORM}; outputs reach 8, where one bfloat16 ulp is 0.031",
    ),
    ("rope_freqs", "float32"): Tolerance(
        atol=0.0, rtol=2.4e-7,
        reason="two float32 ulps: numpy (jaxllm) and torch compute theta ** (-2i / H) with float32 "
        "pow implementations that differ by one or two ulps in some bands",
    ),
    ("rope", "float32"): Tolerance(
        atol=1e-6, rtol=0.0,
        reason="the same float32 angles on both sides; XLA's and PyTorch's cos and sin differ by "
        "about one float32 ulp, also for angles up to 1.3e5 rad",
    ),
    ("rope", "bfloat16"): Tolerance(
        atol=4e-2, rtol=0.0,
        reason="torchref rounds cos and sin to bfloat16 and rotates in bfloat16, jaxllm rotates in "
        "float32 and rounds once; one ulp of values in [4, 8) is 0.031",
    ),
    ("attention", "float32"): Tolerance(
        atol=3e-6, rtol=0.0,
        reason="float32 projections, scores and softmax summed in another order",
    ),
    ("attention", "bfloat16"): Tolerance(
        atol=2e-2, rtol=2e-2,
        reason="bfloat16 projections; torchref rotates q and k in bfloat16, jaxllm in float32",
    ),
    ("mlp", "float32"): Tolerance(
        atol=1e-6, rtol=0.0,
        reason="float32 matmuls summed in another order",
    ),
    ("mlp", "bfloat16"): Tolerance(
        atol=3e-2, rtol=2e-2,
        reason="bfloat16 matmuls over F = 160 terms, accumulated and rounded differently",
    ),
    ("block", "float32"): Tolerance(
        atol=5e-6, rtol=0.0,
        reason="the rounding of two norms, attention and the MLP, added to the residual stream",
    ),
    ("block", "bfloat16"): Tolerance(
        atol=6e-2, rtol=2e-2,
        reason=f"the bfloat16 differences of attention and the MLP, and {_BF16_NORM}",
    ),
    ("logits", "float32"): Tolerance(
        atol=1e-5, rtol=0.0,
        reason="the suite's target: float32 logits within 1e-5 max-abs on the test model",
    ),
    ("logits", "bfloat16"): Tolerance(
        atol=1e-1, rtol=2e-2,
        reason=f"two bfloat16 layers, and {_BF16_HEAD}",
    ),
    ("decode", "float32"): Tolerance(
        atol=1e-5, rtol=0.0,
        reason="the logits target; a cached step sums over cache slots instead of the sequence",
    ),
    ("decode", "bfloat16"): Tolerance(
        atol=1.2e-1, rtol=2e-2,
        reason="as logits in bfloat16, with keys and values stored in bfloat16 on both sides",
    ),
    ("cache_consistency", "float32"): Tolerance(
        atol=1e-5, rtol=0.0,
        reason="the logits target; cached attention sums over cache slots, masked or not",
    ),
    ("cache_consistency", "bfloat16"): Tolerance(
        atol=4e-2, rtol=2e-2,
        reason="bfloat16 attention over the cache length instead of the sequence length",
    ),
    ("left_padded", "float32"): Tolerance(
        atol=1e-5, rtol=0.0,
        reason="the logits target, on real tokens only (logits at padding are not used)",
    ),
    ("left_padded", "bfloat16"): Tolerance(
        atol=1e-1, rtol=2e-2,
        reason=f"as logits in bfloat16: {_BF16_HEAD}",
    ),
    ("greedy", "float32"): Tolerance(
        atol=0.0, rtol=0.0,
        reason="greedy tokens must be identical; bfloat16 is not checked because its logit "
        "differences can flip a near-tie",
    ),
    ("loss", "float32"): Tolerance(
        atol=1e-6, rtol=0.0,
        reason="a mean of 42 float32 log-probabilities of order 5",
    ),
    ("loss", "bfloat16"): Tolerance(
        atol=1e-2, rtol=0.0,
        reason=f"the bfloat16 logit differences averaged over 42 tokens; {_BF16_HEAD}",
    ),
    ("grads", "float32"): Tolerance(
        atol=1e-6, rtol=0.0,
        reason="backward matmuls in another order; gradients are at most 0.3, median 5e-3",
    ),
    ("grads", "bfloat16"): Tolerance(
        atol=1e-2, rtol=5e-2,
        reason="torchref's gradients are bfloat16 tensors, jaxllm's are float32 (float32 "
        "parameters, bfloat16 compute)",
    ),
    ("adamw", "float32"): Tolerance(
        atol=1e-6, rtol=0.0,
        reason="same gradients on both sides; torch.nn.utils.clip_grad_norm_ divides by norm + "
        "1e-6 and optax by the norm, and the updates are of size 1e-2",
    ),
}


def tolerance(rung_key: str, dtype: str) -> Tolerance:
    """Return the tolerance of a rung key and dtype, raising KeyError naming both if absent."""
    try:
        return TOLERANCES[(rung_key, dtype)]
    except KeyError:
        raise KeyError(
            f"no tolerance for rung {rung_key!r} in {dtype}; add one to parity/tolerances.py"
        ) from None
