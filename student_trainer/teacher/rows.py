"""A micro-batch's teacher rows, whichever teacher made them, and the handle the training loop waits on.

The rows know their own loss, so the training loop does not branch on the teacher kind:
:class:`TopkRows` (a teacher service's top-k frame) or :class:`FullRows` (an in-process
teacher's full-vocabulary logits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from shared.codec import TopkFrame
from student_trainer.data import Batch
from student_trainer.loss import LossConfig, gkd_full_vocab_loss, gkd_topk_loss
from student_trainer.modeling import FusedTargets
from student_trainer.sampled_support import with_sampled_token

T = TypeVar("T", covariant=True)


class Handle(Protocol[T]):
    def result(self) -> T: ...


class Deferred:
    """A handle computed on first ``result()`` (a future in flight, a synchronous fetch, an in-process teacher)."""

    def __init__(self, compute: Callable[[], TeacherRows]) -> None:
        self._compute: Callable[[], TeacherRows] | None = compute
        self._value: TeacherRows | None = None

    def result(self) -> TeacherRows:
        if self._compute is not None:
            self._value, self._compute = self._compute(), None
        assert self._value is not None
        return self._value


@dataclass
class TopkRows:
    """The service's top-k rows of one micro-batch (a decoded frame)."""

    frame: TopkFrame
    tempered: bool = False
    """The teacher computed the rows at the loss temperature (else they are raw, tempered by the loss)."""

    def gkd_loss(self, student_logits: torch.Tensor, loss: LossConfig) -> torch.Tensor:
        device = student_logits.device
        tail = self.frame.tail_logmass
        return gkd_topk_loss(
            student_logits,
            self.frame.token_ids.to(device),
            self.frame.logprobs.to(device),
            beta=loss.beta,
            temperature=loss.temperature,
            tail=loss.tail,
            teacher_tail_logmass=None if tail is None else tail.to(device),
            teacher_tempered=self.tempered,
        )

    def topk(self, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.frame.token_ids[:, :k].to(device), self.frame.logprobs[:, :k].to(device)

    def label_logprobs(self, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's log-prob of each row's actual next token (``--loss sampled_kl``)."""
        if self.frame.target_logprobs is None:
            raise ValueError("these teacher rows carry no target_logprobs (request them with the rows)")
        return self.frame.target_logprobs.float().to(labels.device)

    def with_sampled_token(self, labels: torch.Tensor) -> TopkRows:
        """Top-(k+1) rows with target log-probs -> rows whose support holds each row's sampled token."""
        frame = self.frame
        if frame.target_logprobs is None:
            raise ValueError("the sampled token needs target_logprobs in the teacher rows")
        ids, lp, tail = with_sampled_token(
            frame.token_ids, frame.logprobs, labels, frame.target_logprobs, frame.tail_logmass
        )
        return TopkRows(dataclasses.replace(frame, token_ids=ids, logprobs=lp, tail_logmass=tail), self.tempered)

    def fused_targets(
        self, device: torch.device, loss: LossConfig, labels: torch.Tensor | None, sft_alpha: float
    ) -> FusedTargets:
        """The rows as the fused output-layer loss takes them (the student's module computes the loss)."""
        tail = self.frame.tail_logmass
        return FusedTargets(
            ids=self.frame.token_ids.to(device),
            logprobs=self.frame.logprobs.to(device),
            tail_logmass=None if tail is None else tail.to(device),
            labels=labels,
            loss=loss,
            sft_alpha=sft_alpha,
            tempered=self.tempered,
        )


@dataclass
class FullRows:
    """The in-process teacher's logits [N, V] at the rows of one micro-batch."""

    logits: torch.Tensor

    def gkd_loss(self, student_logits: torch.Tensor, loss: LossConfig) -> torch.Tensor:
        return gkd_full_vocab_loss(student_logits, self.logits, beta=loss.beta, temperature=loss.temperature)

    def topk(self, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lp, ids = torch.topk(torch.log_softmax(self.logits.float(), dim=-1), k, dim=-1)
        return ids.to(device), lp.to(device)

    def label_logprobs(self, labels: torch.Tensor) -> torch.Tensor:
        logits = self.logits.float().to(labels.device)
        return (logits.gather(-1, labels.unsqueeze(-1))[:, 0] - torch.logsumexp(logits, dim=-1)).detach()


TeacherRows = TopkRows | FullRows


class Teacher(Protocol):
    """Where rows come from: ``request`` returns at once, ``result()`` on the handle waits for the rows."""

    can_generate: bool

    def request(self, batch: Batch, on_policy: bool = False) -> Handle[TeacherRows]:
        """``on_policy``: the batch's completions are the student's samples (rows for the on-policy loss)."""
        ...

    def close(self) -> None: ...
