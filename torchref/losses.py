"""Training loss of the reference model."""

from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Return the mean negative log-likelihood of ``targets`` over positions where ``mask`` is True.

    ``logits`` [B, T, V] at position t score ``targets[:, t]``, so the caller shifts the
    tokens by one for next-token prediction. log_softmax runs in float32. The sum is
    divided by the number of True positions clamped to at least 1, so an all-False
    mask gives 0. Targets at False positions are ignored and may hold any value, such
    as -100 or a pad id.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
    nll = -log_probs.gather(-1, safe_targets[..., None]).squeeze(-1)  # [B, T]
    total = torch.where(mask, nll, torch.zeros_like(nll)).sum()
    return total / mask.sum().clamp(min=1)
