"""Operational routes: liveness, readiness, Prometheus metrics (no API key: probes and scrapers use them)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from teacher_service.deps import NOT_READY_RETRY_AFTER_S, Metrics
from teacher_service.engines.base import EngineDeadError
from teacher_service.errors import error_response
from teacher_service.scheduling import Scorer

router = APIRouter()


def engine_dead(request: Request) -> Response | None:
    """503 once the engine died (vLLM's engine core gone): only a restart of the service helps."""
    engine = getattr(request.app.state, "engine", None)  # set by the lifespan
    try:
        if engine is not None:
            engine.check_health()
    except EngineDeadError as exc:
        return error_response(503, f"{exc}; this service must be restarted")
    return None


@router.get("/health", response_model=None)
async def health(request: Request) -> Response | dict[str, str]:
    """Liveness: the process serves HTTP (the engine may still be loading) and its engine has not died."""
    return engine_dead(request) or {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(request: Request) -> Response | dict[str, str]:
    """Readiness: the engine is loaded and warmed up, and alive."""
    dead = engine_dead(request)
    if dead is not None:
        return dead
    if not request.app.state.ready:
        return error_response(
            503, "the teacher is still loading its model", headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)}
        )
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(request: Request, m: Metrics) -> Response:
    scorer: Scorer | None = request.app.state.scorer
    m.queue_depth.set(scorer.depth if scorer is not None else 0)
    m.inflight.set(request.app.state.admission.active)
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
