"""One optimizer step (forward, GKD loss, backward over its micro-batches) and the log window that sums steps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

from shared.alignment import next_token_labels
from student_trainer.data import Batch
from student_trainer.loss import LossConfig, completion_cross_entropy
from student_trainer.normalization import all_reduce_sum, loss_scale
from student_trainer.sampled_kl import sampled_kl_loss
from student_trainer.teacher.rows import Handle, TeacherRows, TopkRows


class NonFiniteLossError(RuntimeError):
    """A micro-batch's loss is NaN or infinite: training stops rather than stepping on it."""


@dataclass
class StepStats:
    """One optimizer step on this rank: per-token loss *sums*, and the loss tokens of all ranks."""

    loss: float = 0.0
    gkd: float = 0.0
    ce: float = 0.0
    global_tokens: float = 0.0
    teacher_wait_s: float = 0.0

    def __iadd__(self, other: StepStats) -> StepStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


def train_step(
    engine: Any,
    items: list[tuple[Batch, Handle[TeacherRows] | None]],
    loss: LossConfig,
    sft_alpha: float = 0.0,
    step: int = 0,
    fused_loss: bool = False,
    objective: str = "gkd",
) -> StepStats:
    """Forward and backward every micro-batch of one step; DeepSpeed steps the optimizer after the last one.

    The loss is normalized by the loss tokens of the whole step on all ranks (not per micro-batch).
    ``sft_alpha`` > 0 adds the cross-entropy on the micro-batches' completions (dataset steps only).
    ``fused_loss`` computes top-k rows' loss from the hidden states (the engine's module built with ``fused=True``);
    an in-process teacher's full-vocabulary rows always take the logits path.
    ``objective`` ``sampled_kl`` (``--loss``) trains on the teacher's log-probs of the sampled tokens instead.
    """
    device = engine.device
    stats = StepStats()
    (stats.global_tokens,) = all_reduce_sum([float(sum(b.num_target_tokens for b, _ in items))], device)
    scale = loss_scale(stats.global_tokens, dist.get_world_size(), engine.gradient_accumulation_steps())
    for batch, handle in items:
        if handle is None:
            raise ValueError("a micro-batch reached the step without its teacher rows")
        waited = time.perf_counter()
        rows = handle.result()
        stats.teacher_wait_s += time.perf_counter() - waited
        b_idx, t_idx = batch.row_index(device)
        input_ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        labels = next_token_labels(input_ids, b_idx, t_idx) if sft_alpha > 0 else None
        if objective == "sampled_kl":  # the sampled tokens' log-probs, through the logits
            logits = engine(input_ids, mask, b_idx, t_idx)
            sampled = next_token_labels(input_ids, b_idx, t_idx)
            gkd_sum = loss_sum = sampled_kl_loss(logits, sampled, rows.label_logprobs(sampled)).sum()
        elif fused_loss and isinstance(rows, TopkRows):  # from hidden states and the output layer, chunk by chunk
            out = engine(input_ids, mask, b_idx, t_idx, targets=rows.fused_targets(device, loss, labels, sft_alpha))
            gkd_sum, loss_sum = out.gkd, out.total
            if labels is not None:
                stats.ce += float(out.ce)
        else:
            logits = engine(input_ids, mask, b_idx, t_idx)
            gkd_sum = rows.gkd_loss(logits, loss).sum()
            loss_sum = gkd_sum
            if labels is not None:
                ce_sum = completion_cross_entropy(logits, labels).sum()
                loss_sum = gkd_sum + sft_alpha * ce_sum
                stats.ce += float(ce_sum.detach())
        if not torch.isfinite(loss_sum):
            raise NonFiniteLossError(f"loss is {float(loss_sum)} at step {step} (rank {dist.get_rank()})")
        engine.backward(loss_sum * scale)
        engine.step()
        stats.loss += float(loss_sum.detach())
        stats.gkd += float(gkd_sum.detach())
    return stats


@dataclass
class LogWindow:
    """Steps since the last log line; :meth:`record` reduces them over ranks into token means."""

    sums: StepStats = field(default_factory=StepStats)
    on_policy_steps: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, stats: StepStats, on_policy: bool) -> None:
        self.sums += stats
        self.on_policy_steps += on_policy

    def record(self, device: torch.device, with_ce: bool) -> dict[str, float]:
        """The window's log record (a collective: every rank calls it)."""
        loss, gkd, ce = all_reduce_sum([self.sums.loss, self.sums.gkd, self.sums.ce], device)
        tokens = self.sums.global_tokens
        record = {
            "loss": loss / tokens,
            "gkd_loss": gkd / tokens,
            "tokens_per_s": tokens / (time.perf_counter() - self.started),
            "teacher_wait_s": self.sums.teacher_wait_s,
            "on_policy_steps": self.on_policy_steps,
        }
        if with_ce:
            record["sft_ce"] = ce / tokens
        return record
