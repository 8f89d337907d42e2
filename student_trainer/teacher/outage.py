"""Every rank stops at the same step when a teacher outage outlasts ``--teacher_wait_timeout``.

A rank waiting for its teacher rows holds up the others in the step's collectives. So each rank
first waits for all the rows of its step, then the ranks agree (one small all-reduce) whether any
of them gave up: then all raise :class:`~.errors.TeacherOutageError` before the step changes the
weights, and save the same checkpoint. The collectives' timeout must outlast the wait (set where
the process group is created).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from student_trainer.normalization import all_reduce_sum
from student_trainer.teacher.errors import TeacherOutageError
from student_trainer.teacher.rows import Handle, TeacherRows


def await_step_rows(items: list[tuple[Any, Handle[TeacherRows] | None]], device: torch.device) -> float:
    """Wait for the rows of every micro-batch of the step; the seconds waited. Raises on every rank if any
    rank's teacher stayed unavailable."""
    started = time.perf_counter()
    outage: TeacherOutageError | None = None
    for _, handle in items:
        if handle is None:
            continue
        try:
            handle.result()  # the handle keeps the rows for the step
        except TeacherOutageError as exc:
            outage = exc
            break
    (failed,) = all_reduce_sum([float(outage is not None)], device)
    waited = time.perf_counter() - started  # its own rows, or another rank's
    if outage is not None:
        raise outage
    if failed:
        raise TeacherOutageError(f"the teacher stayed unavailable on {int(failed)} other rank(s)")
    return waited
