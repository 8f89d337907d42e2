"""Teacher backends behind one interface (:class:`TeacherEngine`)."""

from teacher_service.engines.base import ScoreJob, TeacherEngine

__all__ = ["ScoreJob", "TeacherEngine"]
