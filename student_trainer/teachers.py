"""Where a micro-batch's teacher rows come from: a teacher service (top-k) or an in-process model (full vocabulary).

Both answer ``request(batch)`` with a handle whose ``result()`` gives the rows; the
service's handle is a future already in flight (or, with ``--prefetch_depth 0``, a
request made only when the rows are needed); the in-process teacher computes when asked.
The rows know their own loss, so the training loop does not branch on the teacher kind.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from shared.alignment import padded_positions
from shared.codec import TopkFrame
from shared.fingerprint import tokenizer_fingerprint
from student_trainer.data import Batch
from student_trainer.errors import TeacherMismatchError
from student_trainer.generation import generate_completions
from student_trainer.loss import gkd_full_vocab_loss, gkd_topk_loss
from student_trainer.modeling import RowLogitsLM
from student_trainer.prefetch import TeacherPrefetcher

T = TypeVar("T", covariant=True)


class Handle(Protocol[T]):
    def result(self) -> T: ...


class Deferred:
    """A handle computed on first ``result()`` (synchronous fetch, in-process teacher)."""

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

    def gkd_loss(self, student_logits: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
        device = student_logits.device
        tail = self.frame.tail_logmass
        return gkd_topk_loss(
            student_logits,
            self.frame.token_ids.to(device),
            self.frame.logprobs.to(device),
            beta=args.beta,
            temperature=args.temperature,
            tail=args.tail,
            teacher_tail_logmass=None if tail is None else tail.to(device),
        )

    def topk(self, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.frame.token_ids[:, :k].to(device), self.frame.logprobs[:, :k].to(device)


@dataclass
class FullRows:
    """The in-process teacher's logits [N, V] at the rows of one micro-batch."""

    logits: torch.Tensor

    def gkd_loss(self, student_logits: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
        return gkd_full_vocab_loss(student_logits, self.logits, beta=args.beta, temperature=args.temperature)

    def topk(self, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lp, ids = torch.topk(torch.log_softmax(self.logits.float(), dim=-1), k, dim=-1)
        return ids.to(device), lp.to(device)


TeacherRows = TopkRows | FullRows


def row_index(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, position) index of every loss row of ``batch`` (completion rows only)."""
    b_idx, t_idx = padded_positions(batch.attention_mask, batch.first_rows)
    return b_idx.to(device), t_idx.to(device)


class ServiceTeacher:
    """Top-k rows from a teacher service through the background prefetcher."""

    can_generate = False

    def __init__(self, prefetcher: TeacherPrefetcher, top_k: int, want_tail: bool, prefetch: bool) -> None:
        self.prefetcher, self.top_k, self.want_tail, self.prefetch = prefetcher, top_k, want_tail, prefetch

    def _submit(self, batch: Batch) -> Future[TopkFrame]:
        top_k, want_tail = self.top_k, self.want_tail
        return self.prefetcher.submit(
            lambda client: client.topk_logprobs(
                batch.sequences, top_k, first_rows=batch.first_rows, return_tail_logmass=want_tail
            )
        )

    def request(self, batch: Batch) -> Handle[TeacherRows]:
        if not self.prefetch:
            return Deferred(lambda: TopkRows(self._submit(batch).result()))
        future = self._submit(batch)
        return Deferred(lambda: TopkRows(future.result()))

    def close(self) -> None:
        self.prefetcher.close()


class LocalTeacher:
    """An in-process transformers teacher on this rank: full-vocabulary rows and generation."""

    can_generate = True

    def __init__(self, path: str, student_fingerprint: str, student_vocab: int) -> None:
        from transformers import AutoTokenizer

        fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))
        if fingerprint != student_fingerprint:
            raise TeacherMismatchError(
                f"tokenizer mismatch: teacher {path} has {fingerprint}, student has {student_fingerprint}; "
                "teacher and student must share a tokenizer"
            )
        self.path, self.student_vocab = path, student_vocab
        self.model: torch.nn.Module | None = None

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(device).eval()
        model.requires_grad_(False)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        if vocab != self.student_vocab:
            raise TeacherMismatchError(
                f"vocabulary size mismatch: teacher has {vocab}, student has {self.student_vocab}"
            )
        self.model = model
        self._rows = RowLogitsLM(model)

    def row_logits(self, batch: Batch) -> FullRows:
        assert self.model is not None, "load() first"
        device = next(self.model.parameters()).device
        with torch.no_grad():
            b_idx, t_idx = row_index(batch, device)
            logits = self._rows(batch.input_ids.to(device), batch.attention_mask.to(device), b_idx, t_idx)
        return FullRows(logits)

    def request(self, batch: Batch) -> Handle[TeacherRows]:
        return Deferred(lambda: self.row_logits(batch))

    def generate(self, prompts: list[list[int]], **kwargs: object) -> list[list[int]]:
        assert self.model is not None, "load() first"
        return generate_completions(self.model, prompts, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.model = None


Teacher = ServiceTeacher | LocalTeacher
