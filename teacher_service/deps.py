"""FastAPI dependencies: what a route needs from ``app.state``, checked once per request."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from teacher_service.config import ServiceConfig
from teacher_service.engines.base import EngineDeadError, TeacherEngine
from teacher_service.errors import ServiceError
from teacher_service.metrics import ServiceMetrics
from teacher_service.scheduling import Admission, Scorer

NOT_READY_RETRY_AFTER_S = 5


def get_config(request: Request) -> ServiceConfig:
    return request.app.state.config


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_engine(request: Request) -> TeacherEngine:
    """The engine, once it is loaded and warmed up, and while it lives; 503 + Retry-After otherwise."""
    retry = {"Retry-After": str(NOT_READY_RETRY_AFTER_S)}
    if not request.app.state.ready:
        raise ServiceError(503, "the teacher is still loading its model", headers=retry)
    engine: TeacherEngine = request.app.state.engine
    try:
        engine.check_health()
    except EngineDeadError as exc:
        raise ServiceError(503, f"{exc}; the service is to be restarted", headers=retry) from exc
    return engine


def get_scorer(request: Request, engine: Annotated[TeacherEngine, Depends(get_engine)]) -> Scorer:
    return request.app.state.scorer


async def admitted(request: Request) -> AsyncIterator[None]:
    """An admission slot for the request's whole life, body reading included: at most --max-queue scoring
    requests hold memory at once, and the rest are answered 429 before their bodies are read."""
    admission: Admission = request.app.state.admission
    with admission.slot():
        yield


def require_api_key(request: Request) -> None:
    """Bearer-token check for /v1 routes when a key is configured (constant-time compare)."""
    expected: str | None = request.app.state.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise ServiceError(
            401,
            "missing or invalid API key (send `Authorization: Bearer <key>`)",
            "authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


Config = Annotated[ServiceConfig, Depends(get_config)]
Engine = Annotated[TeacherEngine, Depends(get_engine)]
ScorerDep = Annotated[Scorer, Depends(get_scorer)]
Metrics = Annotated[ServiceMetrics, Depends(get_metrics)]
