"""The GKD loss from the student's final hidden states and output layer, in row chunks: never [N, V] logits.

The pattern of Liger-Kernel's fused linear JSD and TRL's chunked divergences: each chunk of rows goes
through the output layer, its loss and the gradient of that loss with respect to the chunk's logits are
computed together, and that gradient is pushed through the layer (into the hidden states and the weight)
before the next chunk, so only [chunk, V] tensors ever exist. As in Liger, the gradients are computed in the
forward (when autograd will want them) rather than by recomputing the logits in the backward: one matmul
per chunk less, and the backward only scales them by the incoming gradient.

Values and gradients are those of the logits path (:mod:`student_trainer.loss`): the same per-row
normalizers (chunked log-sum-exp over the vocabulary, the tail one leaving the teacher's ids out), the same
teacher distribution and generalized JSD, whose gradient with respect to the few student columns
[rows, k(+1)] autograd gives; the chain rule to the logits is then written in place over the chunk.
The teacher rows may have any number of columns (top-k, or top-k plus the sampled token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from student_trainer.loss import LossConfig, generalized_jsd, teacher_distribution

LOGITS_PER_CHUNK = 2**25
"""At most this many fp32 logits per chunk (128 MiB): 220 rows at V=152k, 1024 at V=32k."""

MIN_CHUNKS = 32
"""And at most 1/32 of the rows per chunk (but at least 32 rows), so the chunk stays a few % of [N, V]."""


class FusedLoss(NamedTuple):
    """Row *sums*: ``total`` = gkd + sft_alpha * ce carries the gradient; the parts are for the logs."""

    total: torch.Tensor
    gkd: torch.Tensor
    ce: torch.Tensor


@dataclass(frozen=True)
class _Spec:
    beta: float
    temperature: float
    tail: str
    sft_alpha: float
    row_chunk: int


def row_chunk(rows: int, vocab: int) -> int:
    """Rows per chunk for ``rows`` loss rows over a ``vocab``-wide output layer."""
    return max(1, min(LOGITS_PER_CHUNK // vocab, max(32, math.ceil(rows / MIN_CHUNKS))))


def _chunk(
    z: torch.Tensor,
    ids: torch.Tensor,
    t_log: torch.Tensor,
    labels: torch.Tensor | None,
    spec: _Spec,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(gkd [C], ce [C], d(gkd + sft_alpha ce).sum() / dz) for fp32 logits ``z`` [C, V], which it overwrites.

    For the tail mode or with labels: both need the full normalizer, hence the whole row of logits.
    """
    tail = spec.tail == "tail"
    z_ids = z.gather(-1, ids)
    z_label = z.gather(-1, labels[:, None])[:, 0] if labels is not None else None
    lse = lse_rest = total = rest = None
    if tail or labels is not None:
        # z becomes exp(z - max) in place: one exponential per logit gives both normalizers exactly (the tail's
        # sums the entries outside the ids: no 1 - sum cancellation) and, below, the gradient
        top = z.amax(-1)
        z.sub_(top[:, None]).exp_()
        total = z.sum(-1)
        lse = top + total.log()
        if tail:
            z.scatter_(-1, ids, 0.0)
            rest = z.sum(-1)
            lse_rest = top + rest.log()
    with torch.enable_grad():
        if tail:
            assert lse is not None and lse_rest is not None
            cols = torch.cat([z_ids - lse[:, None], (lse_rest - lse)[:, None]], dim=-1).requires_grad_(want_grad)
            s_log = cols
        else:
            cols = z_ids.clone().requires_grad_(want_grad)
            s_log = F.log_softmax(cols / spec.temperature, dim=-1)
        gkd = generalized_jsd(s_log, t_log, spec.beta)
        inputs = [cols]
        if labels is not None:
            assert lse is not None
            assert z_label is not None
            label_lp = (z_label - lse).requires_grad_(want_grad)
            ce = -label_lp
            inputs.append(label_lp)
        else:
            ce = torch.zeros_like(gkd)
        if not want_grad:
            return gkd.detach(), ce.detach(), None
        grads = torch.autograd.grad(gkd.sum() + spec.sft_alpha * ce.sum(), inputs)
    k = ids.shape[1]
    g_cols = grads[0]
    g_ids = g_cols[:, :k]
    assert lse is not None  # renorm without CE is _sparse_chunk's
    # every log-prob column has the full softmax as normalizer: d/dz_v = [v = id] - p_v, summed with weights
    g_sum = g_ids.sum(-1) if tail else torch.zeros_like(lse)
    g_ce = grads[1] if labels is not None else None
    if tail:
        g_sum = g_sum + g_cols[:, k]
    if g_ce is not None:
        g_sum = g_sum + g_ce
    assert total is not None
    norm, coef = total, -g_sum
    if tail:
        assert lse_rest is not None and rest is not None
        # outside the ids the tail column adds g_tail p_v / p_tail: exp(z_v - lse_rest) = z_v / rest (z holds
        # exp(z - max), zero at the ids); a division, not a multiplication by 1 / rest, which may overflow
        has_tail = rest > 0
        norm = torch.where(has_tail, rest, total)
        coef = torch.where(has_tail, g_cols[:, k] - g_sum * (lse_rest - lse).exp(), coef)
    z.div_(norm[:, None]).mul_(coef[:, None])
    z.scatter_(-1, ids, -g_sum[:, None] * (z_ids - lse[:, None]).exp())  # overwrites entries that may overflow
    z.scatter_add_(-1, ids, g_ids)
    if g_ce is not None:
        z.scatter_add_(-1, labels[:, None], g_ce[:, None])
    return gkd.detach(), ce.detach(), z


def _sparse_chunk(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    t_log: torch.Tensor,
    spec: _Spec,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``renorm`` without CE: (gkd [C], d gkd.sum() / d logits at the ids [C, k], the ids' weight rows [C, k, H]).

    The renormalized loss depends on the logits at the teacher's ids alone, so only those k rows of the
    output layer are used: O(rows x k x H) work instead of O(rows x V x H).
    """
    w_ids = weight[ids]
    z_ids = torch.einsum("ch,ckh->ck", h, w_ids)
    if bias is not None:
        z_ids = z_ids + bias[ids]
    acc = torch.promote_types(weight.dtype, torch.float32)
    with torch.enable_grad():
        cols = z_ids.to(acc).requires_grad_(want_grad)
        gkd = generalized_jsd(F.log_softmax(cols / spec.temperature, dim=-1), t_log, spec.beta)
        if not want_grad:
            return gkd.detach(), None, w_ids
        (g_ids,) = torch.autograd.grad(gkd.sum(), [cols])
    return gkd.detach(), g_ids, w_ids


class _FusedHeadGKD(torch.autograd.Function):
    """(total, gkd, ce) row sums from hidden [N, H] and the output layer (weight [V, H], bias [V] or None)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ids: torch.Tensor,
        t_log: torch.Tensor,
        labels: torch.Tensor | None,
        spec: _Spec,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        want_grad = need_h or need_w or need_b
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        gkd_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        sparse = spec.tail == "renorm" and labels is None
        for lo in range(0, hidden.shape[0], spec.row_chunk):
            rows = slice(lo, lo + spec.row_chunk)
            h = hidden[rows]
            if sparse:  # the loss reads the logits at the teacher's ids only: no [chunk, V] at all
                gkd, g_ids, w_ids = _sparse_chunk(h, weight, bias, ids[rows], t_log[rows], spec, want_grad)
                gkd_sum += gkd.sum()
                if g_ids is None:
                    continue
                g_ids = g_ids.to(weight.dtype)
                if grad_h is not None:
                    grad_h[rows] = torch.einsum("ck,ckh->ch", g_ids, w_ids)
                if grad_w is not None:
                    grad_w.index_add_(0, ids[rows].flatten(), (g_ids[:, :, None] * h[:, None, :]).flatten(0, 1))
                if grad_b is not None:
                    grad_b.index_add_(0, ids[rows].flatten(), g_ids.flatten())
                continue
            z = F.linear(h, weight, bias).to(acc)
            gkd, ce, dz = _chunk(z, ids[rows], t_log[rows], None if labels is None else labels[rows], spec, want_grad)
            gkd_sum += gkd.sum()
            ce_sum += ce.sum()
            if dz is None:
                continue
            dz = dz.to(weight.dtype)
            if grad_h is not None:
                grad_h[rows] = dz @ weight
            if grad_w is not None:
                grad_w.addmm_(dz.t(), h.to(weight.dtype))
            if grad_b is not None:
                grad_b += dz.sum(0)
            del z, dz
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.scaled = False
        gkd_sum, ce_sum = gkd_sum.to(acc), ce_sum.to(acc)
        ctx.mark_non_differentiable(gkd_sum, ce_sum)
        return gkd_sum + spec.sft_alpha * ce_sum, gkd_sum, ce_sum

    @staticmethod
    def backward(ctx: Any, g_total: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.scaled:
            raise RuntimeError("the fused loss scaled its stored gradients in place: it cannot be backwarded again")
        out = list(ctx.saved_tensors)
        if float(g_total) != 1.0:  # in place: no second [V, H] weight gradient
            ctx.scaled = True
            out = [t.mul_(g_total.to(t.dtype)) for t in out]
        return (*(t if has else None for t, has in zip(out, ctx.has, strict=True)), None, None, None, None)


def fused_gkd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    loss: LossConfig,
    teacher_tail_logmass: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    sft_alpha: float = 0.0,
    chunk: int | None = None,
    tempered: bool = False,
) -> FusedLoss:
    """Row sums of the GKD loss (and of the label cross-entropy, weighted by ``sft_alpha`` in ``total``).

    ``hidden`` [N, H] are the final hidden states at the loss rows; the logits are ``hidden @ weight.T + bias``.
    Equal to summing :func:`student_trainer.loss.gkd_topk_loss` (and ``completion_cross_entropy``) over
    those logits, without building them. ``tempered``: the teacher's rows are at the loss temperature; in the
    tail mode the student's logits are then ``hidden @ (weight / T).T``, a temperature-1 loss on a scaled layer.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and output weight {tuple(weight.shape)} do not fit")
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"teacher rows {tuple(teacher_ids.shape)}/{tuple(teacher_logprobs.shape)} do not match "
            f"{hidden.shape[0]} hidden rows"
        )
    t_log = teacher_distribution(teacher_logprobs, loss.temperature, loss.tail, teacher_tail_logmass, tempered)
    if loss.tail == "tail" and loss.temperature != 1.0:
        if labels is not None:
            raise ValueError(
                "the fused loss takes the label cross-entropy (--sft_alpha) with --tail tail at temperature 1 only; "
                "pass --no_fused_loss"
            )
        weight = weight / loss.temperature  # a [V, H] copy, autograd carries the 1/T to the layer's gradient
        bias = None if bias is None else bias / loss.temperature
        loss = LossConfig(loss.beta, 1.0, loss.tail)
    if not 0.0 <= loss.beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {loss.beta}")
    if labels is None and sft_alpha:
        raise ValueError("sft_alpha > 0 needs labels")
    rows = chunk or row_chunk(hidden.shape[0], weight.shape[0])
    spec = _Spec(loss.beta, loss.temperature, loss.tail, sft_alpha, rows)
    ids = teacher_ids.long()
    return FusedLoss(*_FusedHeadGKD.apply(hidden, weight, bias, ids, t_log, labels, spec))
