"""Log-space helpers shared by both sides."""

from __future__ import annotations

import math

import torch


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x (Maechler 2012)."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


TAIL_FLOOR = math.log(1e-7)
"""Smallest tail log-mass derived from top-k log-probs: below it, 1 - sum(p) is rounding, not mass."""


def tail_from_topk(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top-k))) per row (summed in float64), floored at :data:`TAIL_FLOOR`.

    Only for tails *derived* from the top-k (vLLM sends no normalizer): a confident fp32 top-1
    rounds to 0.0 and would claim an empty tail, making reverse KL infinite. A softmax never
    gives exactly zero mass outside k < V tokens, so the floor is closer to the truth.
    """
    return log1mexp(torch.logsumexp(topk_logprobs.double(), dim=-1)).clamp_min(TAIL_FLOOR).float()
