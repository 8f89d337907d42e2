"""DeepSpeed student trainer for GKD against a teacher service.

Layout: ``config`` (the settings dataclass and its CLI/YAML parser), ``teacher/`` (clients of the
teacher APIs, prefetching, the in-process teacher), ``data``, ``loss`` and ``logprobs`` (pure maths),
``step`` (one optimizer step), ``rollout`` and ``generation`` (generated completions), ``train``
(set-up and the loop), ``checkpoint``, ``evaluate``, ``logs``.
"""

from student_trainer.loss import LossConfig, generalized_jsd, gkd_topk_loss
from student_trainer.teacher import (
    TeacherClient,
    TeacherError,
    TeacherMismatchError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
    VllmTeacherClient,
    make_client,
)

__all__ = [
    "LossConfig",
    "TeacherClient",
    "TeacherError",
    "TeacherMismatchError",
    "TeacherProtocolError",
    "TeacherRequestError",
    "TeacherUnavailableError",
    "VllmTeacherClient",
    "generalized_jsd",
    "gkd_topk_loss",
    "make_client",
]
