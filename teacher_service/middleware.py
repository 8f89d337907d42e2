"""Request ids, one structured log line per request, and per-route metrics, as plain ASGI (no per-request task)."""

from __future__ import annotations

import contextvars
import logging
import time
import uuid

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from teacher_service.disconnect import CLIENT_CLOSED_REQUEST, ClientGone
from teacher_service.errors import error_type
from teacher_service.metrics import ServiceMetrics

logger = logging.getLogger("teacher_service.access")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Stamps every log record with the id of the request being served (or '-')."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        token = request_id_var.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except (ClientGone, ClientDisconnect):  # nobody to answer (gone during or after its body): not an error
            status = CLIENT_CLOSED_REQUEST
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            if status == CLIENT_CLOSED_REQUEST:
                self.metrics.cancelled_requests.labels(route).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            if 400 <= status != CLIENT_CLOSED_REQUEST:
                self.metrics.errors.labels(error_type(status)).inc()
            if route not in ("/health", "/ready", "/metrics"):
                logger.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    scope["path"],
                    status,
                    elapsed * 1000,
                    extra={"route": route, "status": status, "latency_ms": round(elapsed * 1000, 2)},
                )
            request_id_var.reset(token)
