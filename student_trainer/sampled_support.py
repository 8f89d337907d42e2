"""The student's sampled token joins the teacher's support (on-policy steps).

Over the teacher's top-k alone, a token the student sampled outside it is only part of the "tail"
class, so reverse KL (beta > 0) cannot tell it from any other unlikely token. TRL's server trainer
gives it its own class; so does this transform, on the rows as they arrive, so that every loss that
reads (ids, log-probs, tail) rows of any width sees it unchanged.

The teacher is asked for k+1 columns and the log-prob of the actual next token (``target_logprobs``).
Per row:

- the sampled token is among the k+1 ids: the rows stay as they are (top-(k+1), its tail);
- it is not: column k becomes (sampled token, its log-prob) and the tail loses that token's mass and
  gains column k's: ``tail' = log(P(outside top-(k+1)) - p(sampled) + p_k)``.

Either way a row has k+1 distinct ids (a duplicated id would count the student's mass twice), and the
support always holds the teacher's top-k and the sampled token.
"""

from __future__ import annotations

import torch

from shared.logmath import log1mexp, tail_from_topk


def with_sampled_token(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    labels: torch.Tensor,
    target_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, log-probs [N, k+1] float32, tail [N]) with each row's sampled token ``labels`` in its support.

    ``ids``/``logprobs``: the teacher's top-(k+1) [N, k+1]; ``target_logprobs``: log p(label) [N];
    ``tail_logmass``: log P(outside the k+1) [N], derived from the log-probs when the teacher sent none.
    """
    if ids.shape != logprobs.shape or ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"expected top-(k+1) rows [N, k+1] with k >= 1, got ids {tuple(ids.shape)}")
    if labels.shape != ids.shape[:1] or target_logprobs.shape != ids.shape[:1]:
        raise ValueError("labels and target_logprobs need one entry per row")
    ids, lp = ids.clone(), logprobs.float().clone()
    target = target_logprobs.float()
    tail = tail_logmass.float() if tail_logmass is not None else tail_from_topk(lp)
    outside = ~(ids == labels.unsqueeze(-1).to(ids.dtype)).any(dim=-1)
    last = lp[:, -1]
    # P(outside k+1) - p(label) >= 0 in exact arithmetic (the label is outside the k+1); rounding may push it
    # below: then the remaining mass is column k's alone.
    rest = tail + log1mexp((target - tail).clamp_max(0.0))
    new_tail = torch.logaddexp(rest, last)
    ids[:, -1] = torch.where(outside, labels.to(ids.dtype), ids[:, -1])
    lp[:, -1] = torch.where(outside, target, last)
    return ids, lp, torch.where(outside, new_tail, tail)
