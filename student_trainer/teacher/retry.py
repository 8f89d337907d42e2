"""The one retry policy of every HTTP call to a teacher: the asynchronous scoring clients' and the synchronous
generation client's (:mod:`.generate`), so both retry, back off and fail alike.

Transient failures (a connection that fails or is dropped, 429, 502-504) are retried with capped, jittered
exponential backoff honouring ``Retry-After``; a timeout waiting for an answer is not (the request may still be
running: a retry would double the load of an overloaded teacher); anything else becomes a typed
:mod:`.errors` exception naming the teacher's message and field.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import httpx

from student_trainer.teacher.errors import TeacherError, TeacherRequestError, TeacherUnavailableError

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({429, 502, 503, 504})


@dataclass
class RetryPolicy:
    """``connect_retries`` (default ``max_retries``) bounds the retries of a failed connection alone: a replica
    pool sets it low, so that a dead replica is ejected at once rather than after the backoff."""

    base_url: str
    max_retries: int = 5
    connect_retries: int | None = None
    backoff_base: float = 0.5
    backoff_max: float = 30.0

    def after_transport_error(self, attempt: int, path: str, exc: httpx.TransportError) -> float:
        """The delay before the next attempt, or the error to raise (a timeout waiting for the answer, or the
        connection retries spent)."""
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            raise TeacherUnavailableError(f"teacher at {self.base_url} timed out on {path}: {exc!r}") from exc
        limit = self.max_retries if self.connect_retries is None else self.connect_retries
        if attempt >= limit:
            raise TeacherUnavailableError(
                f"teacher at {self.base_url} unreachable after {attempt + 1} attempts: {exc!r}"
            ) from exc
        return self.backoff(attempt, None)

    def after_response(self, attempt: int, resp: httpx.Response) -> float | None:
        """None for an answer to use; the delay before the next attempt; or the error to raise."""
        if resp.status_code < 400:
            return None
        if resp.status_code not in TRANSIENT_STATUS or attempt >= self.max_retries:
            raise error_from(resp)
        return self.backoff(attempt, resp.headers.get("retry-after"))

    def backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self.backoff_max)
            except ValueError:
                pass  # an HTTP-date Retry-After: exponential backoff instead
        return min(self.backoff_base * 2**attempt, self.backoff_max) * (0.5 + random.random() / 2)

    def log_retry(self, method: str, path: str, attempt: int, delay: float) -> None:
        logger.warning(
            "teacher %s %s failed (attempt %d/%d), retrying in %.1fs",
            method,
            path,
            attempt,
            self.max_retries + 1,
            delay,
        )


def error_from(resp: httpx.Response) -> TeacherError:
    """The typed error of a failed answer, with the teacher's message and the field it names (vLLM's shapes)."""
    try:
        body = resp.json()
        err = body["error"] if isinstance(body.get("error"), dict) else body  # vLLM's older flat shape
        message, param = str(err["message"]), err.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, param = resp.text[:500], None
    if resp.status_code in TRANSIENT_STATUS:
        return TeacherUnavailableError(f"teacher overloaded (HTTP {resp.status_code}) after retries: {message}")
    return TeacherRequestError(resp.status_code, message, param)
