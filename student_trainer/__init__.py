"""DeepSpeed student trainer for GKD against a teacher service."""

from student_trainer.client import TeacherClient
from student_trainer.errors import (
    TeacherError,
    TeacherMismatchError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from student_trainer.loss import generalized_jsd, gkd_topk_loss

__all__ = [
    "TeacherClient",
    "TeacherError",
    "TeacherMismatchError",
    "TeacherProtocolError",
    "TeacherRequestError",
    "TeacherUnavailableError",
    "generalized_jsd",
    "gkd_topk_loss",
]
