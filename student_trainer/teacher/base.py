"""The teacher-client contract and the HTTP plumbing every client shares.

A client is asynchronous, one per trainer (never a module global: the served model name and
handshake are cached on the instance), and makes one request per micro-batch. Transient
failures (connection errors, 429, 502-504) are retried with capped backoff honouring
``Retry-After``; everything else raises a typed error from :mod:`.errors`. A failed request
never turns into filler rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol, TypeVar

import httpx

from shared.codec import TopkFrame
from shared.protocol import LogprobDtype
from student_trainer.teacher.retry import RetryPolicy

TOKENIZER_PROBE = "GKD probe: The 3 quick foxes, 42 + 17 = 59; naïve café 東京 🙂\n\tend."
"""Text whose token ids teacher and student must agree on (where a teacher publishes no fingerprint)."""


class ServedModel(Protocol):
    """What every handshake names: the served model (sent back in each request)."""

    @property
    def model(self) -> str: ...


class AsyncTeacherClient(Protocol):
    """What the trainer needs from a teacher, whatever API it speaks."""

    base_url: str

    async def info(self) -> ServedModel:
        """The teacher's handshake, fetched once per client instance."""
        ...

    async def check_compatible(
        self, vocab_size: int, tokenizer_fingerprint: str, top_k: int, probe: tuple[str, list[int]] | None = None
    ) -> ServedModel:
        """Refuse (:class:`~.errors.TeacherMismatchError`) a teacher that would teach the wrong tokens."""
        ...

    async def topk_logprobs(
        self,
        sequences: Sequence[Sequence[int]],
        top_k: int,
        first_rows: Sequence[int] | None = None,
        *,
        row_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
        logprobs_dtype: LogprobDtype = "float16",
        return_target_logprobs: bool = False,
        return_tail_logmass: bool = False,
    ) -> TopkFrame:
        """Top-k rows of every sequence of one micro-batch, checked against the request: rows
        ``first_rows[b]..`` or, as the alternative, the rows of ``row_spans[b]`` (one span per assistant turn;
        the frame then carries the spans). Neither: every row."""
        ...

    async def ready(self) -> bool:
        """One readiness probe, no retries: whether the teacher would answer now."""
        ...

    async def aclose(self) -> None: ...


_C = TypeVar("_C", bound="HttpTeacher")


class HttpTeacher:
    """Pooled connections and retries of transient failures, for the concrete clients to build on.

    ``connect_retries`` (default ``max_retries``) bounds the retries of a connection failure alone:
    a replica pool sets it low, so that a dead replica is ejected at once rather than after the backoff.
    ``host_header`` addresses a replica by IP under its Service's name (headless Service expansion).
    """

    READY_PATH = "/ready"
    """Answers 200 once the teacher serves (the subclass for stock vLLM uses ``/health``)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        api_key: str | None = None,
        max_retries: int = 5,
        connect_retries: int | None = None,
        host_header: str | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if host_header:
            headers["Host"] = host_header
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            headers=headers,
            transport=transport,
        )
        self.retry = RetryPolicy(self.base_url, max_retries, connect_retries, backoff_base, backoff_max)

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ready(self) -> bool:
        """One GET of the readiness endpoint, no retries: 200 means ready; anything else, or no answer, not."""
        try:
            resp = await self._http.get(self.READY_PATH, timeout=5.0)
        except httpx.TransportError:
            return False
        return resp.status_code == 200

    async def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """One HTTP call with retries for transient failures only (:class:`~.retry.RetryPolicy`)."""
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
            except httpx.TransportError as exc:
                delay = self.retry.after_transport_error(attempt, path, exc)
            else:
                answered = self.retry.after_response(attempt, resp)
                if answered is None:
                    return resp
                delay = answered
            attempt += 1
            self.retry.log_retry(method, path, attempt, delay)
            await asyncio.sleep(delay)
