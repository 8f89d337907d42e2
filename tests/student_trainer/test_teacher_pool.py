"""Replicas of a teacher and named teachers, against real services (uvicorn, fake engines): load spread, a lost
replica, outages waited out and bounded, a mix of teachers refused, headless-Service names, recycled connections,
rows routed by teacher name."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import torch
from support import FakeEngine, serve_in_thread

from shared.codec import TopkFrame
from student_trainer.teacher import TeacherClient, TeacherPool, TeacherRouter
from student_trainer.teacher.errors import TeacherMismatchError, TeacherOutageError
from student_trainer.teacher.pool import resolve_addresses
from teacher_service.app import create_app
from teacher_service.config import ServiceConfig
from teacher_service.process import free_port

FINGERPRINT, VOCAB, K = "sha256:fake", 100, 4
SEQS = [[1, 2, 3, 4], [5, 6, 7]]


class MarkedEngine(FakeEngine):
    """A fake engine whose rows carry its mark (the token ids start at ``mark``), under a model name of choice."""

    def __init__(self, mark: int = 0, name: str = "fake-teacher", delay_s: float = 0.0) -> None:
        super().__init__(delay_s=delay_s)
        self.served_model_name, self.mark = name, mark

    async def score(self, job: Any) -> TopkFrame:
        frame = await super().score(job)
        frame.token_ids += self.mark
        return frame


@contextlib.contextmanager
def service(engine: FakeEngine, port: int | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    with serve_in_thread(create_app(ServiceConfig(model="unused"), engine=engine), port=port, host=host) as url:
        deadline = time.monotonic() + 10
        while not engine.loaded.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield url


def make_pool(urls: list[str], **kwargs: Any) -> TeacherPool:
    kwargs.setdefault("probe_backoff", (0.05, 0.2))
    return TeacherPool(
        urls, lambda url, host: TeacherClient(url, connect_retries=0, host_header=host, max_retries=1), **kwargs
    )


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def served(engine: FakeEngine) -> int:
    """Requests an engine answered (the service's micro-batcher may merge several into one engine call)."""
    return sum(engine.calls) // len(SEQS)


async def _requests(pool: TeacherPool, n: int, concurrency: int = 2) -> list[TopkFrame]:
    """``n`` requests, ``concurrency`` in flight (as the trainer's prefetch depth)."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> TopkFrame:
        async with gate:
            return await pool.topk_logprobs(SEQS, K, first_rows=[1, 1])

    return await asyncio.gather(*(one() for _ in range(n)))


def test_three_replicas_share_the_load_and_a_lost_one_loses_no_request() -> None:
    engines = [MarkedEngine(delay_s=0.005) for _ in range(3)]
    with contextlib.ExitStack() as stack:
        doomed = contextlib.ExitStack()  # the third replica, stopped mid-run
        stack.callback(doomed.close)
        urls = [stack.enter_context(service(e)) for e in engines[:2]] + [doomed.enter_context(service(engines[2]))]

        async def scenario() -> tuple[list[int], list[int], int]:
            pool = make_pool(urls)
            try:
                await pool.check_compatible(VOCAB, FINGERPRINT, K)
                assert len(await _requests(pool, 60, concurrency=3)) == 60
                spread = [served(e) for e in engines]
                await asyncio.to_thread(doomed.close)  # replica 3 goes away
                frames = await _requests(pool, 30, concurrency=3)
                after = [served(e) for e in engines]
                return spread, after, len(frames)
            finally:
                await pool.aclose()

        spread, after, answered = run(scenario)
    assert answered == 30  # no request lost
    assert all(abs(n - 20) <= 4 for n in spread), spread  # within 20% of even
    assert after[2] == spread[2]  # nothing more reached the stopped replica
    assert after[0] - spread[0] + after[1] - spread[1] == 30  # the other two took its load
    assert abs((after[0] - spread[0]) - (after[1] - spread[1])) <= 6


def test_an_outage_is_waited_out_on_the_same_port(caplog: pytest.LogCaptureFixture) -> None:
    """The only replica stops; a request waits (logging) and is answered once it is back on its port."""
    port = free_port()
    down = contextlib.ExitStack()
    url = down.enter_context(service(MarkedEngine(), port=port))

    async def scenario() -> TopkFrame:
        pool = make_pool([url], wait_timeout=30, log_interval=0.2)
        try:
            await pool.check_compatible(VOCAB, FINGERPRINT, K)
            await asyncio.to_thread(down.close)
            request = asyncio.create_task(pool.topk_logprobs(SEQS, K, first_rows=[1, 1]))
            await asyncio.sleep(1.0)
            assert not request.done()  # held, not failed, not filled in
            with service(MarkedEngine(mark=7), port=port):
                return await asyncio.wait_for(request, 20)
        finally:
            await pool.aclose()

    with caplog.at_level(logging.WARNING, logger="student_trainer.teacher.pool"):
        frame = run(scenario)
    assert int(frame.token_ids[0, 0]) == 7  # answered by the restarted service
    waits = [r.getMessage() for r in caplog.records if "unavailable for" in r.getMessage()]
    assert len(waits) >= 2 and "waiting up to 30 s" in waits[0], waits


def test_an_outage_past_the_wait_timeout_raises() -> None:
    down = contextlib.ExitStack()
    url = down.enter_context(service(MarkedEngine()))

    async def scenario() -> float:
        pool = make_pool([url], wait_timeout=1.0)
        try:
            await pool.check_compatible(VOCAB, FINGERPRINT, K)
            await asyncio.to_thread(down.close)
            started = time.monotonic()
            with pytest.raises(TeacherOutageError, match=r"unavailable for \d+ s, longer than --teacher_wait_timeout"):
                await pool.topk_logprobs(SEQS, K, first_rows=[1, 1])
            return time.monotonic() - started
        finally:
            await pool.aclose()

    assert run(scenario) >= 1.0


def test_a_stop_request_ends_the_wait_early() -> None:
    """A SIGTERM (``interrupted``) during an outage ends the wait at once, so the preempted trainer still has its
    grace period to save a checkpoint instead of waiting up to --teacher_wait_timeout."""
    down = contextlib.ExitStack()
    url = down.enter_context(service(MarkedEngine()))
    told: list[bool] = []

    async def scenario() -> float:
        pool = make_pool([url], wait_timeout=60.0, interrupted=lambda: bool(told))
        try:
            await pool.check_compatible(VOCAB, FINGERPRINT, K)
            await asyncio.to_thread(down.close)
            asyncio.get_running_loop().call_later(0.5, told.append, True)
            started = time.monotonic()
            with pytest.raises(TeacherOutageError, match="when the trainer was told to stop"):
                await pool.topk_logprobs(SEQS, K, first_rows=[1, 1])
            return time.monotonic() - started
        finally:
            await pool.aclose()

    assert run(scenario) < 30.0  # not the 60 s wait


def test_a_mix_of_teachers_is_refused() -> None:
    with service(MarkedEngine(name="teacher-a")) as a, service(MarkedEngine(name="teacher-b")) as b:

        async def scenario() -> None:
            pool = make_pool([a, b])
            try:
                await pool.check_compatible(VOCAB, FINGERPRINT, K)
            finally:
                await pool.aclose()

        with pytest.raises(TeacherMismatchError, match="all replicas of one teacher must serve the same model"):
            run(scenario)


def test_a_headless_name_is_expanded_and_re_resolved() -> None:
    """A name resolving to one address, then two: the new replica is probed, admitted and given requests."""
    port = free_port()
    first, second = MarkedEngine(mark=0), MarkedEngine(mark=50)
    addresses = ["127.0.0.1"]

    async def resolver(host: str, p: int) -> list[str]:
        assert (host, p) == ("teacher.test", port)
        return list(addresses)

    with service(first, port=port), service(second, port=port, host="127.0.0.2"):

        async def scenario() -> list[str]:
            pool = make_pool([f"http://teacher.test:{port}"], resolver=resolver, resolve_interval=0.1)
            try:
                await pool.check_compatible(VOCAB, FINGERPRINT, K)
                await _requests(pool, 4)
                assert second.calls == []
                addresses.append("127.0.0.2")
                deadline = time.monotonic() + 10
                while not all(r.admitted for r in pool.replicas) or len(pool.replicas) < 2:
                    assert time.monotonic() < deadline, pool.replicas
                    await asyncio.sleep(0.05)
                await _requests(pool, 10)
                return [r.url for r in pool.replicas]
            finally:
                await pool.aclose()

        urls = run(scenario)
    assert urls == [f"http://127.0.0.1:{port}", f"http://127.0.0.2:{port}"]
    assert len(second.calls) >= 4  # the new replica takes its share


def test_localhost_resolves_with_the_system_resolver() -> None:
    assert "127.0.0.1" in asyncio.run(resolve_addresses("localhost", 80))


def test_connections_are_recycled_after_their_max_age() -> None:
    made: list[TeacherClient] = []

    def factory(url: str, host: str | None) -> TeacherClient:
        made.append(TeacherClient(url, connect_retries=0, host_header=host))
        return made[-1]

    with service(MarkedEngine()) as url:

        async def scenario() -> None:
            pool = TeacherPool([url], factory, max_age=0.0)
            try:
                await pool.check_compatible(VOCAB, FINGERPRINT, K)
                await _requests(pool, 5, concurrency=1)
                await asyncio.sleep(0.1)  # closing is scheduled
            finally:
                await pool.aclose()

        run(scenario)
    assert len(made) == 6  # the handshake's client, then one per request
    assert all(c._http.is_closed for c in made)


def test_named_teachers_answer_their_rows_in_the_batch_order() -> None:
    math, code = MarkedEngine(mark=10, name="math"), MarkedEngine(mark=60, name="code")
    with service(math) as math_url, service(code) as code_url:

        async def scenario() -> TopkFrame:
            router = TeacherRouter({"math": make_pool([math_url], name="math"), "code": make_pool([code_url])})
            try:
                infos = await router.check_compatible(VOCAB, FINGERPRINT, K)
                assert {n: i.model for n, i in infos.items()} == {"math": "math", "code": "code"}
                sequences = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
                spans = [[(1, 3)], [(0, 2)], [(2, 4)]]
                return await router.topk_logprobs(["code", "math", "code"], sequences, K, row_spans=spans)
            finally:
                await router.aclose()

        frame = run(scenario)
    assert [frame.rows(b).stop - frame.rows(b).start for b in range(3)] == [2, 2, 2]
    marks = [int(frame.token_ids[frame.rows(b).start, 0]) for b in range(3)]
    assert marks == [60, 10, 60]
    assert frame.spans() == [[(1, 3)], [(0, 2)], [(2, 4)]]
    assert sum(math.calls) == 1 and sum(code.calls) == 2  # one request per teacher for the mixed micro-batch
    assert torch.equal(frame.logprobs[0], -torch.arange(1, K + 1, dtype=torch.float32).to(frame.logprobs.dtype))
