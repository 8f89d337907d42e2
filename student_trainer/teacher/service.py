"""Top-k rows from a teacher service, requested through the background prefetcher."""

from __future__ import annotations

from concurrent.futures import Future

from shared.codec import TopkFrame
from student_trainer.data import Batch
from student_trainer.teacher.prefetch import TeacherPrefetcher
from student_trainer.teacher.routing import TeacherRouter
from student_trainer.teacher.rows import Deferred, Handle, TeacherRows, TopkRows


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
    ) -> None:
        """``temperature`` != 1: the rows are asked for at that temperature (the loss's), so the teacher's tail
        is exact there; only for a teacher whose handshake says ``applies_temperature``."""
        self.prefetcher, self.top_k, self.want_tail, self.prefetch = prefetcher, top_k, want_tail, prefetch
        self.temperature = temperature

    def _submit(self, batch: Batch) -> Future[TopkFrame]:
        """The batch's loss rows only (one span per assistant turn): the frame's rows line up with
        ``batch.row_index()``, span by span."""
        top_k, want_tail, temperature = self.top_k, self.want_tail, self.temperature
        at_t = {} if temperature == 1.0 else {"temperature": temperature}  # the vllm client takes none
        return self.prefetcher.submit(
            lambda router: router.topk_logprobs(
                batch.teachers, batch.sequences, top_k, row_spans=batch.row_spans, return_tail_logmass=want_tail, **at_t
            )
        )

    def request(self, batch: Batch) -> Handle[TeacherRows]:
        tempered = self.temperature != 1.0
        if not self.prefetch:
            return Deferred(lambda: TopkRows(self._submit(batch).result(), tempered))
        future = self._submit(batch)
        return Deferred(lambda: TopkRows(future.result(), tempered))

    def close(self) -> None:
        self.prefetcher.close()
