"""Top-k rows from a teacher service, requested through the background prefetcher."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Literal

from shared.alignment import next_token_labels
from shared.codec import TopkFrame
from student_trainer.data import Batch
from student_trainer.teacher.prefetch import TeacherPrefetcher
from student_trainer.teacher.routing import TeacherRouter
from student_trainer.teacher.rows import Deferred, Handle, TeacherRows, TopkRows

OnPolicyRows = Literal["topk", "sampled_class", "sampled_only"]
"""What on-policy steps ask for: the plain top-k; top-(k+1) with the sampled token as its own class
(:mod:`student_trainer.sampled_support`); or only the sampled token's log-prob (``--loss sampled_kl``)."""


class ServiceTeacher:
    """``request`` sends the micro-batch at once (or, with ``prefetch=False``, when its rows are needed); each
    sequence goes to its named teacher (:class:`~.routing.TeacherRouter`)."""

    can_generate = False

    def __init__(
        self,
        prefetcher: TeacherPrefetcher[TeacherRouter],
        top_k: int,
        want_tail: bool,
        prefetch: bool,
        temperature: float = 1.0,
        on_policy_rows: OnPolicyRows = "topk",
    ) -> None:
        """``temperature`` != 1: the rows are asked for at that temperature (the loss's), so the teacher's tail
        is exact there; only for a teacher whose handshake says ``applies_temperature``."""
        self.prefetcher, self.top_k, self.want_tail, self.prefetch = prefetcher, top_k, want_tail, prefetch
        self.temperature = temperature
        self.on_policy_rows = on_policy_rows

    def _submit(self, batch: Batch, top_k: int, target: bool = False) -> Future[TopkFrame]:
        """The batch's loss rows only (one span per assistant turn): the frame's rows line up with
        ``batch.row_index()``, span by span."""
        want_tail, temperature = self.want_tail, self.temperature
        at_t = {} if temperature == 1.0 else {"temperature": temperature}  # the vllm client takes none
        return self.prefetcher.submit(
            lambda router: router.topk_logprobs(
                batch.teachers,
                batch.sequences,
                top_k,
                row_spans=batch.row_spans,
                return_tail_logmass=want_tail,
                return_target_logprobs=target,
                **at_t,
            )
        )

    def request(self, batch: Batch, on_policy: bool = False) -> Handle[TeacherRows]:
        mode = self.on_policy_rows if on_policy else "topk"
        top_k = {"topk": self.top_k, "sampled_class": self.top_k + 1, "sampled_only": 1}[mode]
        target = mode != "topk"
        tempered = self.temperature != 1.0

        def rows(frame: TopkFrame) -> TeacherRows:
            if mode != "sampled_class":
                return TopkRows(frame, tempered)
            labels = next_token_labels(batch.input_ids, *batch.row_index())
            return TopkRows(frame, tempered).with_sampled_token(labels)

        if not self.prefetch:
            return Deferred(lambda: rows(self._submit(batch, top_k, target).result()))
        future = self._submit(batch, top_k, target)
        return Deferred(lambda: rows(future.result()))

    def close(self) -> None:
        self.prefetcher.close()
