"""Abandoned work: a client that disconnects or times out stops consuming the engine (micro-batched and
self-scheduling engines), and an engine that died fails /health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import FakeEngine, serve_in_thread

from shared.codec import TopkFrame
from teacher_service.app import create_app
from teacher_service.config import ServiceConfig
from teacher_service.engines.base import EngineDeadError, ScoreJob

TOPK = "/v1/topk_logprobs"


def body(n_sequences: int) -> dict[str, object]:
    """A request told apart from the others in the engine's log by its number of sequences."""
    return {"sequences": [[1, 2, 3, 4]] * n_sequences, "top_k": 2}


class GatedEngine(FakeEngine):
    """Records each job's sequence count and holds it until ``gate`` opens; notes the jobs cancelled inside it."""

    def __init__(self, batches_internally: bool = False) -> None:
        super().__init__()
        self.batches_internally = batches_internally
        self.gate = threading.Event()
        self.started: list[int] = []
        self.cancelled: list[int] = []

    async def score(self, job: ScoreJob) -> TopkFrame:
        self.started.append(len(job.sequences))
        try:
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.append(len(job.sequences))
            raise
        return await super().score(job)


def sample(url: str, name: str, **labels: str) -> float:
    """One sample of the service's /metrics (0 when the labelled series does not exist yet)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def post_in_thread(url: str, payload: dict[str, object]) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}{TOPK}", json=payload, timeout=60)))
    thread.start()
    return thread, answers


@contextlib.contextmanager
def posted_then_hung_up(url: str, payload: dict[str, object]) -> Iterator[None]:
    """A complete request on a raw connection, closed on exit without reading the answer (a client gone)."""
    parts = urlsplit(url)
    data = json.dumps(payload).encode()
    head = f"POST {TOPK} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        yield


def test_a_timed_out_request_never_reaches_the_micro_batched_engine() -> None:
    """A's batch holds the engine; B, queued behind it, times out: B is dropped before any batch runs it."""
    engine = GatedEngine()
    with serve_in_thread(create_app(ServiceConfig(model="unused", batch_wait_ms=0), engine=engine)) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "readiness")
        first, answers = post_in_thread(url, body(1))
        wait_until(lambda: engine.started == [1], "the first request in the engine")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{TOPK}", json=body(3), timeout=httpx.Timeout(60, read=0.5))
        wait_until(lambda: sample(url, "gkd_teacher_cancelled_requests_total", route=TOPK) == 1, "the cancel")
        engine.gate.set()
        first.join(timeout=30)
        assert answers[0].status_code == 200
        wait_until(lambda: sample(url, "gkd_teacher_cancelled_jobs_total", stage="queued") == 1, "the drop")
        assert httpx.post(f"{url}{TOPK}", json=body(2)).status_code == 200
        assert engine.started == [1, 2]  # the abandoned 3-sequence job was never scored
        assert sample(url, "gkd_teacher_requests_total", route=TOPK, status="499") == 1
        assert sample(url, "gkd_teacher_cancelled_jobs_total", stage="running") == 0
        assert sample(url, "gkd_teacher_errors_total") == 0  # a departed client is not a service error
        assert sample(url, "gkd_teacher_inflight_requests") == 0  # its admission slot was given back


def test_a_disconnected_client_cancels_the_self_scheduling_engine_call() -> None:
    """With an engine that schedules requests itself (vLLM), the hang-up cancels the engine's coroutine,
    which is what aborts vLLM's requests; the service keeps serving."""
    engine = GatedEngine(batches_internally=True)
    with serve_in_thread(create_app(ServiceConfig(model="unused"), engine=engine)) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "readiness")
        with posted_then_hung_up(url, body(3)):
            wait_until(lambda: engine.started == [3], "the request in the engine")
        wait_until(lambda: engine.cancelled == [3], "the engine call to be cancelled")
        assert sample(url, "gkd_teacher_cancelled_jobs_total", stage="engine") == 1
        assert sample(url, "gkd_teacher_cancelled_requests_total", route=TOPK) == 1
        engine.gate.set()
        assert httpx.post(f"{url}{TOPK}", json=body(2)).status_code == 200
        assert engine.started == [3, 2] and engine.cancelled == [3]


def test_a_request_answered_in_time_is_not_cancelled() -> None:
    engine = GatedEngine(batches_internally=True)
    engine.gate.set()
    with serve_in_thread(create_app(ServiceConfig(model="unused"), engine=engine)) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "readiness")
        with httpx.Client(timeout=30) as client:  # one kept-alive connection for all of them
            assert all(client.post(f"{url}{TOPK}", json=body(1)).status_code == 200 for _ in range(5))
        assert engine.cancelled == [] and sample(url, "gkd_teacher_cancelled_requests_total", route=TOPK) == 0


class MortalEngine(FakeEngine):
    """An engine whose worker processes can die, as vLLM's engine core can."""

    dead = False

    def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("the fake engine's worker died")


def test_a_dead_engine_fails_health_readiness_and_requests() -> None:
    engine = MortalEngine()
    with serve_in_thread(create_app(ServiceConfig(model="unused"), engine=engine)) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "readiness")
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        engine.dead = True
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "worker died" in health.json()["error"]["message"]
        assert httpx.get(f"{url}/ready").status_code == 503
        refused = httpx.post(f"{url}{TOPK}", json=body(1))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert "restarted" in refused.json()["error"]["message"]
