"""Micro-batches paired with their teacher rows, requested ``depth`` micro-batches ahead of training.

Only micro-batches of steps that train on dataset completions are requested ahead:
generated completions do not exist yet, and are scored as soon as they are generated.
The feed reads the data iterator ahead, so it also remembers the data position of the
last micro-batch actually *consumed*: that, not the iterator's, is what a checkpoint saves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from student_trainer.data import Batch
from student_trainer.teacher.rows import Handle, TeacherRows


class TeacherFeed:
    def __init__(
        self,
        batches: Iterator[Batch],
        request: Callable[[Batch], Handle[TeacherRows]],
        depth: int,
        micro_per_step: int,
        first_step: int,
        ahead: Callable[[int], bool],
    ) -> None:
        self._batches, self._request, self._depth = batches, request, depth
        self._micro_per_step, self._first_step, self._ahead = micro_per_step, first_step, ahead
        self._queue: deque[tuple[Batch, Handle[TeacherRows] | None]] = deque()
        self._enqueued = 0
        self.consumed_state: dict[str, int] = {}
        self._top_up()

    def _enqueue(self) -> None:
        batch = next(self._batches)
        step = self._first_step + self._enqueued // self._micro_per_step
        self._enqueued += 1
        self._queue.append((batch, self._request(batch) if self._ahead(step) else None))

    def _top_up(self) -> None:
        while len(self._queue) < self._depth:
            self._enqueue()

    def take(self, n: int) -> list[tuple[Batch, Handle[TeacherRows] | None]]:
        """The next ``n`` micro-batches (one step); handles are None where the step generates its completions."""
        out = []
        for _ in range(n):
            if not self._queue:
                self._enqueue()
            out.append(self._queue.popleft())
            self._top_up()
        self.consumed_state = out[-1][0].data_state
        return out
