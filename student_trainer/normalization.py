"""Token normalization of the loss across micro-batches and data-parallel ranks.

The objective of one optimizer step is the sum of per-token losses over every
micro-batch on every rank divided by the total number of loss tokens. DeepSpeed
divides each micro-batch's loss by the accumulation steps (``engine.backward``) and
averages gradients over the data-parallel ranks; :func:`loss_scale` undoes both
averages so that the gradient is that of the global token mean, not a mean of
per-micro-batch means (biased whenever token counts differ).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def loss_scale(global_tokens: float, world_size: int, grad_accum_steps: int) -> float:
    """Factor for a micro-batch's *summed* loss before ``engine.backward``."""
    if global_tokens <= 0:
        raise ValueError(f"an optimizer step needs loss tokens, got {global_tokens}")
    return world_size * grad_accum_steps / global_tokens


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum float64 values over all ranks (one collective for all of them)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]
