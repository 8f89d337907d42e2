"""Admission control and micro-batching in front of the engine.

Concurrent requests (one per trainer rank, typically) are grouped into one forward
pass under a token budget, waiting at most ``max_wait_s`` for company; results are
routed back to each caller. Admission keeps the number of jobs in the service
bounded, so overload turns into 429 + Retry-After instead of unbounded memory.

A caller that leaves (its request cancelled when its client disconnects, see
:mod:`teacher_service.disconnect`) leaves no work behind: its queued job is dropped before a
batch is formed, and cancelling :meth:`DirectScorer.score` cancels the engine's own requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from shared.codec import TopkFrame
from teacher_service.engines.base import ScoreJob, TeacherEngine
from teacher_service.errors import ServiceError
from teacher_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    """What the routes, /metrics and shutdown use of whatever scores jobs: :class:`MicroBatcher` or
    :class:`DirectScorer` (``app.state.scorer``, None until the engine is ready)."""

    @property
    def depth(self) -> int:
        """Jobs waiting for the engine (the queue-depth gauge)."""
        ...

    async def score(self, job: ScoreJob) -> TopkFrame: ...

    async def close(self) -> None:
        """Stop scoring at shutdown; the engine itself is closed by the app."""
        ...


class DirectScorer:
    """Jobs straight to an engine that schedules concurrent requests itself (vLLM): nothing queues here.

    A cancelled caller cancels the engine's coroutine, which aborts its requests (vLLM: ``AsyncLLM.abort``).
    """

    depth = 0

    def __init__(self, engine: TeacherEngine, metrics: ServiceMetrics | None = None) -> None:
        self.engine, self.metrics = engine, metrics

    async def score(self, job: ScoreJob) -> TopkFrame:
        try:
            return await self.engine.score(job)
        except asyncio.CancelledError:
            if self.metrics is not None:
                self.metrics.cancelled_jobs.labels("engine").inc()
            raise

    async def close(self) -> None:
        """Nothing of its own to stop: the engine is closed by the app's lifespan."""


class Admission:
    """At most ``limit`` jobs queued or running; the rest are told to come back later."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit, self.retry_after_s, self.active = limit, retry_after_s, 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise ServiceError(
                429,
                f"the teacher is at its limit of {self.limit} queued requests; retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


@dataclass
class _Pending:
    job: ScoreJob
    future: asyncio.Future[TopkFrame] = field(repr=False)


class MicroBatcher:
    """Groups concurrent :class:`ScoreJob` into one engine call; one batch runs at a time."""

    def __init__(
        self,
        engine: TeacherEngine,
        max_batch_tokens: int,
        max_wait_s: float,
        max_batch_requests: int = 64,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.engine, self.max_batch_tokens, self.max_wait_s = engine, max_batch_tokens, max_wait_s
        self.max_batch_requests = max_batch_requests
        self.metrics = metrics
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: deque[_Pending] = deque()
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._carry)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name="micro-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def score(self, job: ScoreJob) -> TopkFrame:
        if self._task is None or self._task.done():
            raise RuntimeError("micro-batcher is not running")
        pending = _Pending(job, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(pending)
        return await pending.future

    async def _next(self, timeout: float | None) -> _Pending | None:
        """The next job whose caller still waits: carried over, queued, or (within ``timeout``; None = forever)
        arriving. Jobs of callers that left are dropped here, before they take a place in a batch."""
        while True:
            pending = await self._next_any(timeout)
            if pending is None or not pending.future.done():
                return pending
            self._dropped("queued")

    async def _next_any(self, timeout: float | None) -> _Pending | None:
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            return None

    def _dropped(self, stage: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.cancelled_jobs.labels(stage).inc(n)

    async def _collect(self) -> list[_Pending]:
        first = await self._next(None)
        assert first is not None
        batch, tokens = [first], first.job.num_tokens
        loop = asyncio.get_running_loop()
        # Waiting for company pays off for small requests (per-forward overhead dominates); a request that
        # fills half the budget on its own runs with whatever is already queued, without waiting.
        wait = self.max_wait_s if 2 * tokens < self.max_batch_tokens else 0.0
        deadline = loop.time() + wait
        while tokens < self.max_batch_tokens and len(batch) < self.max_batch_requests:
            nxt = await self._next(max(deadline - loop.time(), 0.0))
            if nxt is None:
                break
            if tokens + nxt.job.num_tokens > self.max_batch_tokens or nxt.job.temperature != first.job.temperature:
                self._carry.appendleft(nxt)
                break
            batch.append(nxt)
            tokens += nxt.job.num_tokens
        return batch

    async def _run_forever(self) -> None:
        while True:
            collected = await self._collect()
            batch = [p for p in collected if not p.future.done()]  # callers that left while it waited for company
            self._dropped("queued", len(collected) - len(batch))
            if not batch:
                continue
            await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        jobs = [p.job for p in batch]
        merged = ScoreJob(
            sequences=[s for j in jobs for s in j.sequences],
            row_spans=[spans for j in jobs for spans in j.row_spans],
            top_k=max(j.top_k for j in jobs),
            want_target_logprobs=any(j.want_target_logprobs for j in jobs),
            want_tail_logmass=any(j.want_tail_logmass for j in jobs),
            temperature=jobs[0].temperature,  # _collect batches one temperature at a time
        )
        if self.metrics is not None:
            self.metrics.observe_batch(len(jobs), len(merged.sequences), merged.num_tokens)
        try:
            frame = await self.engine.score(merged)
            results, lo = [], 0
            for p in batch:
                hi = lo + len(p.job.sequences)
                results.append(_only_requested(frame.select(lo, hi, p.job.top_k), p.job))  # its sequences, spans
                lo = hi
        except Exception as exc:  # every caller of the batch gets the error, raised in its own request
            logger.exception("engine failed on a batch of %d requests", len(jobs))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
            else:  # left while its batch ran: a transformers forward cannot be stopped midway
                self._dropped("running")


def _only_requested(frame: TopkFrame, job: ScoreJob) -> TopkFrame:
    """A batch computes the union of extras; each caller gets what it asked for."""
    if not job.want_target_logprobs:
        frame.target_logprobs = frame.target_ranks = None
    if not job.want_tail_logmass:
        frame.tail_logmass = None
    return frame
