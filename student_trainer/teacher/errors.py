"""Typed teacher-client failures, always raised ``from`` their cause. A failure stops training.

TeacherError                      the teacher could not supply the rows a step needs
├── TeacherUnavailableError       connection failures or overload (429/502-504) that outlasted the retries
│   └── TeacherOutageError        no replica ready for --teacher_wait_timeout: the run saves and stops
├── TeacherRequestError           the teacher refused a request (4xx/500): retrying cannot help
├── TeacherProtocolError          the answer does not match the request, or the wire format
└── TeacherMismatchError          handshake: this teacher cannot teach this student
"""

from __future__ import annotations


class TeacherError(RuntimeError):
    """Base class: the teacher could not supply the rows a step needs."""


class TeacherUnavailableError(TeacherError):
    """Connection failures or overload (429/502/503/504) that outlasted the retries."""


class TeacherOutageError(TeacherUnavailableError):
    """No replica of a teacher answered for ``--teacher_wait_timeout``: the trainer checkpoints and exits."""


class TeacherRequestError(TeacherError):
    """The teacher refused a request (4xx/500); retrying the same request cannot help."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(f"teacher answered HTTP {status}: {message}" + (f" (field: {param})" if param else ""))
        self.status = status
        self.param = param


class TeacherProtocolError(TeacherError):
    """The answer does not match the request (row counts, k, model) or the wire format."""


class TeacherMismatchError(TeacherError):
    """Handshake: this teacher cannot teach this student (vocabulary or tokenizer differ)."""
