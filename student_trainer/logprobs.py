"""Student log-probs at chosen token ids, with an optional tail class, in O(rows x k) extra memory.

Autograd on ``gather(logits) - logsumexp(logits)`` keeps every fp32 chunk that went
through the log-sum-exp for its backward and builds one [N, V] gradient per path into
the logits (gather, normaliser, tail) before summing them: two to three extra [N, V]
tensors at the peak. :class:`_ChosenLogProbs` saves only per-row scalars and rebuilds
softmax chunks in the backward, writing the one [N, V] gradient the logits need anyway.
"""

from __future__ import annotations

from typing import Any

import torch

ROW_CHUNK = 32
"""Rows per chunk: the temporaries are a few [ROW_CHUNK, V] fp32 tensors (1.6% of [2048, V] each)."""


def _acc(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half types, unchanged for fp32/fp64 (float64 keeps gradient checks meaningful)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def chunked_logsumexp(
    logits: torch.Tensor, scale: float = 1.0, exclude: torch.Tensor | None = None, row_chunk: int = ROW_CHUNK
) -> torch.Tensor:
    """logsumexp(logits * scale) per row, optionally leaving out the ids in ``exclude`` [N, k].

    Row chunks keep the fp32 temporaries to ``row_chunk`` rows: no second [N, V] tensor
    (when called without autograd, as :class:`_ChosenLogProbs` does).
    Excluding the top-k ids gives the tail mass exactly (no 1 - sum cancellation).
    """
    parts = []
    for i in range(0, logits.shape[0], row_chunk):
        chunk = _acc(logits[i : i + row_chunk])
        if scale != 1.0:
            chunk = chunk * scale
        if exclude is not None:
            chunk = chunk.scatter(-1, exclude[i : i + row_chunk].long(), float("-inf"))
        parts.append(torch.logsumexp(chunk, dim=-1))
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


class _ChosenLogProbs(torch.autograd.Function):
    """log p(ids) [N, k] (+ log p(outside ids) as column k when ``with_tail``) from logits [N, V]."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ids: torch.Tensor, with_tail: bool) -> torch.Tensor:
        lse = chunked_logsumexp(logits)
        out = _acc(logits.gather(-1, ids)) - lse.unsqueeze(-1)
        lse_rest = None
        if with_tail:
            lse_rest = chunked_logsumexp(logits, exclude=ids)
            out = torch.cat([out, (lse_rest - lse).unsqueeze(-1)], dim=-1)
        ctx.save_for_backward(logits, ids, lse, out, *(() if lse_rest is None else (lse_rest,)))
        ctx.with_tail = with_tail
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        logits, ids, lse, out, *rest = ctx.saved_tensors
        k = ids.shape[1]
        g = _acc(grad_out)
        g_sum = g.sum(dim=-1, keepdim=True)  # every column's normaliser is the full softmax
        # d out[:, j]/dz = onehot(ids_j) - p;  d tail/dz_v = [v not in ids] p_v / p_tail - p_v.
        # Outside the ids both are multiples of exp(z - base) with base = log(tail mass) where the
        # row has a tail (then p_v = exp(z_v - base) * p_tail): one exp pass per chunk, no masked copy.
        at_ids = -g_sum * out[:, :k].exp()  # then + g at each column: scatter_add, as an id may appear twice
        base, coef = lse.unsqueeze(-1), -g_sum
        if ctx.with_tail:
            has_tail = torch.isfinite(rest[0]).unsqueeze(-1)
            base = torch.where(has_tail, rest[0].unsqueeze(-1), base)
            coef = torch.where(has_tail, g[:, k : k + 1] - g_sum * out[:, k : k + 1].exp(), coef)
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ROW_CHUNK):
            rows = slice(i, i + ROW_CHUNK)
            chunk = torch.sub(_acc(logits[rows]), base[rows]).exp_().mul_(coef[rows])
            chunk.scatter_(-1, ids[rows], at_ids[rows])  # overwrites entries that may have overflowed
            chunk.scatter_add_(-1, ids[rows], g[rows, :k])
            grad[rows] = chunk
        return grad, None, None


def chosen_logprobs(logits: torch.Tensor, ids: torch.Tensor, with_tail: bool = False) -> torch.Tensor:
    """log-softmax(logits) at ``ids`` [N, k]; with ``with_tail`` a column k holding log(1 - sum)."""
    return _ChosenLogProbs.apply(logits, ids.long(), with_tail)
