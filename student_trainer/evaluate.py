"""Held-out metrics: next-token cross-entropy on completions and KL(teacher||student) over the teacher's top-k."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.alignment import next_token_labels
from student_trainer.data import Batch, Example, collate
from student_trainer.loss import LossConfig, gkd_topk_loss
from student_trainer.normalization import all_reduce_sum
from student_trainer.teacher.rows import Handle, TeacherRows

RowLogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    ce: float
    kl: float
    tokens: int


def row_logits_fn(model: torch.nn.Module) -> RowLogitsFn:
    """Full-forward row logits of a HF causal LM (evaluation only: memory is not the concern here)."""

    def fn(input_ids: torch.Tensor, mask: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=mask).logits[b_idx, t_idx]

    return fn


@torch.no_grad()
def evaluate(
    student: RowLogitsFn,
    teacher: RowLogitsFn | None,
    examples: Sequence[Example],
    pad_id: int,
    top_k: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Token-weighted CE of ``student`` on completion tokens, and its top-k KL to ``teacher`` (nan if none).

    The KL is forward KL(teacher||student) with both renormalized over the teacher's top-k:
    the quantity the default GKD loss (beta=0) drives to zero.
    """
    ce_sum, kl_sum, n = 0.0, 0.0, 0
    for lo in range(0, len(examples), batch_size):
        batch = collate(examples[lo : lo + batch_size], pad_id)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        b_idx, t_idx = batch.row_index(device)
        labels = next_token_labels(ids, b_idx, t_idx)
        s_logits = student(ids, mask, b_idx, t_idx).float()
        ce_sum += float(F.cross_entropy(s_logits, labels, reduction="sum"))
        if teacher is not None:
            t_logits = teacher(ids, mask, b_idx, t_idx).float()
            t_lp, t_ids = torch.topk(torch.log_softmax(t_logits, dim=-1), top_k, dim=-1)
            kl_sum += float(gkd_topk_loss(s_logits, t_ids, t_lp, beta=0.0, tail="renorm").sum())
        n += labels.numel()
    return EvalResult(ce=ce_sum / n, kl=kl_sum / n if teacher is not None else float("nan"), tokens=n)


@torch.no_grad()
def sharded_eval(
    student: RowLogitsFn,
    request: Callable[[Batch], Handle[TeacherRows]],
    examples: Sequence[Example],
    *,
    rank: int,
    world: int,
    batch_size: int,
    pad_id: int,
    top_k: int,
    loss: LossConfig,
    device: torch.device,
) -> dict[str, float]:
    """Held-out metrics of the training student, each rank on its shard, summed over ranks.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters in each),
    so the last ``len(examples) % world`` examples are left out. Returns token means of the
    cross-entropy, the top-k forward KL (as :func:`evaluate`) and the training objective.
    """
    usable = len(examples) - len(examples) % world
    mine = examples[rank:usable:world]
    batches = [collate(mine[lo : lo + batch_size], pad_id) for lo in range(0, len(mine), batch_size)]
    window: deque[Handle[TeacherRows]] = deque()
    ce = kl = gkd = 0.0
    tokens = 0
    for i, batch in enumerate(batches):
        while len(window) < 2 and i + len(window) < len(batches):  # teacher rows one batch ahead
            window.append(request(batches[i + len(window)]))
        rows = window.popleft().result()
        b_idx, t_idx = batch.row_index(device)
        labels = next_token_labels(batch.input_ids.to(device), b_idx, t_idx)
        logits = student(batch.input_ids.to(device), batch.attention_mask.to(device), b_idx, t_idx).float()
        t_ids, t_lp = rows.topk(top_k, device)
        ce += float(F.cross_entropy(logits, labels, reduction="sum"))
        kl += float(gkd_topk_loss(logits, t_ids, t_lp, beta=0.0, tail="renorm").sum())
        gkd += float(rows.gkd_loss(logits, loss).sum())
        tokens += labels.numel()
    ce, kl, gkd, total = all_reduce_sum([ce, kl, gkd, float(tokens)], device)
    return {"ce": ce / total, "kl_topk": kl / total, "gkd_loss": gkd / total, "tokens": total}
