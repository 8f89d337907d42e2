"""FastAPI service that serves a teacher LLM's top-k log-probs over HTTP."""

from teacher_service.app import create_app
from teacher_service.config import DEFAULT_PORT, ServiceConfig

__all__ = ["DEFAULT_PORT", "ServiceConfig", "create_app"]
