"""The GKD loss over the teacher's top-k: pure functions on tensors, fp32, tested against float64.

Generalized JSD as in TRL's GKD: with mixture M = (1-beta) S + beta T,
JSD_beta = beta KL(T||M) + (1-beta) KL(S||M); the endpoints are taken exactly
(beta=0 is forward KL(T||S), beta=1 is reverse KL(S||T)) rather than as limits.

Two treatments of the probability outside the teacher's top-k:
- ``tail`` (default): one extra class holding the mass outside the top-k on both sides
  (as TRL's server trainer). Renormalizing alone only matches the *shape* of the
  student's top-k and leaves how much mass it puts there unconstrained; with the tail
  class the student also learns to concentrate its mass where the teacher does: in the
  demo its held-out cross-entropy ends far lower than with ``renorm`` (docs/benchmarks.md).
  It costs a chunked log-sum-exp over the student's vocabulary and needs the teacher's
  tail at the loss temperature: raw (temperature 1) rows, or rows the teacher computed at
  that temperature (``teacher_tempered``: a service that applies the request's temperature).
- ``renorm``: both distributions renormalized over the teacher's top-k ids (as
  ms-swift). No full-vocabulary normalizer on either side, and exact for any
  temperature over the kept set: the choice when ``temperature != 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from shared.logmath import tail_from_topk
from student_trainer.logprobs import chosen_logprobs, chunked_logsumexp

__all__ = [
    "LossConfig",
    "chunked_logsumexp",
    "completion_cross_entropy",
    "generalized_jsd",
    "gkd_full_vocab_loss",
    "gkd_topk_loss",
    "kl_div_log",
    "teacher_distribution",
    "topk_distributions",
]

TailMode = Literal["renorm", "tail"]


@dataclass(frozen=True)
class LossConfig:
    """The settings the GKD loss reads (``--beta``, ``--temperature``, ``--tail``), and no others."""

    beta: float = 0.5
    temperature: float = 1.0
    tail: TailMode = "tail"


def kl_div_log(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p||q) per row from log-probs, treating 0 * log 0 (p = 0) as 0, in value and gradient."""
    p = p_log.exp()
    live = p > 0
    return (p * torch.where(live, p_log - q_log, torch.zeros_like(p))).sum(dim=-1)


def generalized_jsd(student_log: torch.Tensor, teacher_log: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD between two normalized log-distributions over the same classes."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl_div_log(teacher_log, student_log)
    if beta == 1.0:
        return kl_div_log(student_log, teacher_log)
    # a class empty on both sides (a tail when k covers the vocabulary) has an empty mixture, and a zero gradient
    empty = torch.isneginf(student_log) & torch.isneginf(teacher_log)
    s, t = (torch.where(empty, torch.zeros_like(x), x) for x in (student_log, teacher_log))
    mixture = torch.logsumexp(torch.stack([s + math.log(1.0 - beta), t + math.log(beta)]), dim=0)
    mixture = torch.where(empty, torch.full_like(mixture, float("-inf")), mixture)
    return beta * kl_div_log(teacher_log, mixture) + (1.0 - beta) * kl_div_log(student_log, mixture)


def topk_distributions(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
    tail: TailMode = "tail",
    teacher_tail_logmass: torch.Tensor | None = None,
    teacher_tempered: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student log-dist, teacher log-dist) on the teacher's top-k support, [N, k] or [N, k+1].

    ``teacher_tail_logmass`` (from the teacher, computed in fp32 before the log-probs were
    cast for the wire) is preferred over re-deriving the tail from the sent log-probs.
    ``teacher_tempered``: the teacher's rows (and tail) are already log_softmax(logits / temperature),
    so they are used as they are and the tail class works at any temperature.
    """
    t_log = teacher_distribution(teacher_logprobs, temperature, tail, teacher_tail_logmass, teacher_tempered)
    ids = teacher_ids.long()
    if tail == "renorm":
        s_at = student_logits.gather(-1, ids)
        s_at = s_at.to(torch.promote_types(s_at.dtype, torch.float32)) / temperature  # fp32, or fp64 in tests
        return F.log_softmax(s_at, dim=-1), t_log
    scaled = student_logits if temperature == 1.0 else student_logits / temperature
    return chosen_logprobs(scaled, ids, with_tail=True), t_log


def teacher_distribution(
    teacher_logprobs: torch.Tensor,
    temperature: float = 1.0,
    tail: TailMode = "tail",
    teacher_tail_logmass: torch.Tensor | None = None,
    teacher_tempered: bool = False,
) -> torch.Tensor:
    """The teacher's log-distribution on its top-k support, [N, k] (renorm) or [N, k+1] (tail), fp32.

    Shared by the logits loss and the fused output-layer loss, so both read the teacher alike.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t_at = teacher_logprobs.float() if teacher_tempered else teacher_logprobs.float() / temperature
    if tail == "renorm":
        return F.log_softmax(t_at, dim=-1)
    if tail != "tail":
        raise ValueError(f"tail must be 'renorm' or 'tail', got {tail!r}")
    if temperature != 1.0 and not teacher_tempered:
        raise ValueError(
            "tail='tail' at temperature != 1 needs teacher rows computed at that temperature: the tail mass of "
            "raw rows is only known at temperature 1"
        )
    if teacher_tail_logmass is not None:
        t_tail = teacher_tail_logmass.float().unsqueeze(-1)
    else:
        t_tail = tail_from_topk(t_at).unsqueeze(-1)
    return torch.cat([t_at, t_tail], dim=-1)


def gkd_topk_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: TailMode = "tail",
    teacher_tail_logmass: torch.Tensor | None = None,
    teacher_tempered: bool = False,
) -> torch.Tensor:
    """Per-row GKD loss [N] for student logits [N, V] against teacher top-k rows [N, k].

    The caller sums rows and divides by the number of valid tokens of the whole
    optimizer step (all micro-batches, all ranks), not per micro-batch.
    """
    s_log, t_log = topk_distributions(
        student_logits, teacher_ids, teacher_logprobs, temperature, tail, teacher_tail_logmass, teacher_tempered
    )
    return generalized_jsd(s_log, t_log, beta)


def gkd_full_vocab_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Per-row GKD loss [N] on the full vocabulary (in-process teacher): the formula top-k approximates.

    Builds several [N, V] fp32 tensors: a comparison mode for small teachers, not the scalable path.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    s_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return generalized_jsd(s_log, t_log, beta)


def completion_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row next-token cross-entropy [N] (the ``sft_alpha`` term), without an [N, V] log-softmax."""
    return -chosen_logprobs(student_logits, labels.unsqueeze(-1))[:, 0]
