"""Asynchronous teacher clients: one request per micro-batch, state per instance.

:class:`TeacherClient` speaks this project's service (binary frames);
:class:`~student_trainer.vllm_client.VllmTeacherClient` speaks vLLM's ``/v1/completions``.

The served model name and handshake are fetched once and cached on the instance
(never in a module global, which would leak between trainers in one process).
Transient failures are retried with capped backoff honouring ``Retry-After``;
everything else raises a typed error. A failed request never turns into filler rows.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any, TypeVar

import httpx

from shared.alignment import num_rows
from shared.codec import FrameError, TopkFrame, decode_frame
from shared.protocol import TOPK_MEDIA_TYPE, LogprobDtype, TeacherInfo, TopkRequest
from student_trainer.errors import (
    TeacherError,
    TeacherMismatchError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
)

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({429, 502, 503, 504})


_C = TypeVar("_C", bound="HttpTeacher")

TOKENIZER_PROBE = "GKD probe: The 3 quick foxes, 42 + 17 = 59; naïve café 東京 🙂\n\tend."
"""Text whose token ids teacher and student must agree on (where a teacher publishes no fingerprint)."""


class HttpTeacher:
    """HTTP plumbing shared by the teacher clients: pooled connections, retries of transient failures."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        api_key: str | None = None,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            headers=headers,
            transport=transport,
        )
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        """One HTTP call with retries for transient failures only."""
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                if attempt >= self.max_retries:
                    raise TeacherUnavailableError(
                        f"teacher at {self.base_url} unreachable after {attempt + 1} attempts: {exc!r}"
                    ) from exc
                delay = self._backoff(attempt, None)
            except httpx.TimeoutException as exc:
                raise TeacherUnavailableError(f"teacher at {self.base_url} timed out on {path}: {exc!r}") from exc
            else:
                if resp.status_code < 400:
                    return resp
                if resp.status_code not in TRANSIENT_STATUS or attempt >= self.max_retries:
                    raise self._error_from(resp)
                delay = self._backoff(attempt, resp.headers.get("retry-after"))
            attempt += 1
            logger.warning(
                "teacher %s %s failed (attempt %d/%d), retrying in %.1fs",
                method,
                path,
                attempt,
                self.max_retries + 1,
                delay,
            )
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self.backoff_max)
            except ValueError:
                pass  # an HTTP-date Retry-After: fall back to exponential backoff
        return min(self.backoff_base * 2**attempt, self.backoff_max) * (0.5 + random.random() / 2)

    @staticmethod
    def _error_from(resp: httpx.Response) -> TeacherError:
        try:
            body = resp.json()
            err = body["error"] if isinstance(body.get("error"), dict) else body  # vLLM's older flat shape
            message, param = str(err["message"]), err.get("param")
        except (ValueError, KeyError, TypeError, AttributeError):
            message, param = resp.text[:500], None
        if resp.status_code in TRANSIENT_STATUS:
            return TeacherUnavailableError(f"teacher overloaded (HTTP {resp.status_code}) after retries: {message}")
        return TeacherRequestError(resp.status_code, message, param)


class TeacherClient(HttpTeacher):
    """Talks to one teacher service of this project. Create one per trainer; use from a single event loop."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._info: TeacherInfo | None = None

    async def info(self) -> TeacherInfo:
        """The teacher's handshake, fetched once per client instance."""
        if self._info is None:
            resp = await self._request("GET", "/v1/info")
            try:
                self._info = TeacherInfo.model_validate_json(resp.content)
            except ValueError as exc:
                raise TeacherProtocolError(f"/v1/info answer is not a teacher handshake: {exc}") from exc
            logger.info(
                "teacher %s serves %r (vocab %d, max k %d, engine %s)",
                self.base_url,
                self._info.model,
                self._info.vocab_size,
                self._info.max_top_k,
                self._info.engine,
            )
        return self._info

    async def model_name(self) -> str:
        return (await self.info()).model

    async def check_compatible(
        self, vocab_size: int, tokenizer_fingerprint: str, top_k: int, probe: tuple[str, list[int]] | None = None
    ) -> TeacherInfo:
        """Refuse to train against a teacher that would teach the wrong tokens (``probe`` is for other APIs)."""
        info = await self.info()
        if info.tokenizer_fingerprint != tokenizer_fingerprint:
            raise TeacherMismatchError(
                f"tokenizer mismatch: teacher {info.model!r} has {info.tokenizer_fingerprint}, "
                f"student has {tokenizer_fingerprint}; teacher and student must share a tokenizer"
            )
        if info.vocab_size != vocab_size:
            raise TeacherMismatchError(
                f"vocabulary size mismatch: teacher {info.model!r} has {info.vocab_size}, student has {vocab_size}"
            )
        if top_k > info.max_top_k:
            raise TeacherMismatchError(f"--top_k {top_k} exceeds the teacher's maximum of {info.max_top_k}")
        return info

    async def topk_logprobs(
        self,
        sequences: Sequence[Sequence[int]],
        top_k: int,
        first_rows: Sequence[int] | None = None,
        logprobs_dtype: LogprobDtype = "float16",
        return_target_logprobs: bool = False,
        return_tail_logmass: bool = False,
    ) -> TopkFrame:
        """Top-k rows of a whole micro-batch in one request, checked against what was asked."""
        model = await self.model_name()
        req = TopkRequest(
            model=model,
            sequences=[list(map(int, s)) for s in sequences],
            top_k=top_k,
            first_rows=None if first_rows is None else [int(f) for f in first_rows],
            logprobs_dtype=logprobs_dtype,
            return_target_logprobs=return_target_logprobs,
            return_tail_logmass=return_tail_logmass,
        )
        resp = await self._request(
            "POST",
            "/v1/topk_logprobs",
            content=req.model_dump_json(exclude_none=True),
            headers={"content-type": "application/json", "accept": TOPK_MEDIA_TYPE},
        )
        try:
            frame = decode_frame(resp.content)
        except FrameError as exc:
            raise TeacherProtocolError(f"teacher sent an unreadable frame: {exc}") from exc
        self._check_frame(frame, req, model)
        return frame

    @staticmethod
    def _check_frame(frame: TopkFrame, req: TopkRequest, model: str) -> None:
        firsts = req.resolved_first_rows()
        expected = [num_rows(len(s)) - f for s, f in zip(req.sequences, firsts, strict=True)]
        got = (frame.row_offsets[1:] - frame.row_offsets[:-1]).tolist()
        if got != expected:
            raise TeacherProtocolError(f"teacher returned rows per sequence {got}, expected {expected}")
        if frame.top_k != req.top_k:
            raise TeacherProtocolError(f"teacher returned k={frame.top_k}, asked for {req.top_k}")
        if frame.first_rows.tolist() != firsts:
            raise TeacherProtocolError("teacher returned different first rows than requested")
        if frame.metadata.get("model") not in (None, model):
            raise TeacherProtocolError(f"frame is from model {frame.metadata.get('model')!r}, expected {model!r}")


def make_client(api: str, base_url: str, **kwargs: Any) -> TeacherClient:
    """The client for ``--teacher_api`` (``gkd`` or ``vllm``)."""
    if api == "gkd":
        return TeacherClient(base_url, **kwargs)
    if api == "vllm":
        from student_trainer.vllm_client import VllmTeacherClient

        return VllmTeacherClient(base_url, **kwargs)  # type: ignore[return-value]
    raise ValueError(f"unknown teacher API {api!r}; expected 'gkd' or 'vllm'")
