"""Readiness, overload, authentication, metrics, request ids, micro-batching and draining."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time

import httpx
import pytest
import torch
from support import FakeEngine, serve_in_thread

from demo.tiny import TinyAssets
from shared.codec import decode_frame
from student_trainer.teacher import TeacherClient
from student_trainer.teacher.errors import TeacherRequestError
from teacher_service.app import create_app
from teacher_service.config import ServiceConfig
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.hf import HFEngine
from teacher_service.process import TeacherProcess

BODY = {"sequences": [[1, 2, 3, 4]], "top_k": 2}


def _wait_ready(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/ready").status_code != 200:
        assert time.monotonic() < deadline, "service never became ready"
        time.sleep(0.02)


def test_liveness_before_readiness() -> None:
    engine = FakeEngine()
    engine.release_start = False
    with serve_in_thread(create_app(ServiceConfig(model="unused"), engine=engine)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        busy = httpx.post(f"{url}/v1/topk_logprobs", json=BODY)
        assert busy.status_code == 503 and busy.json()["error"]["type"] == "ServiceUnavailableError"
        assert busy.headers["retry-after"] == "5"
        engine.release_start = True
        _wait_ready(url)
        assert httpx.post(f"{url}/v1/topk_logprobs", json=BODY).status_code == 200


def test_bounded_queue_answers_429_with_retry_after() -> None:
    engine = FakeEngine(delay_s=0.3)
    app = create_app(ServiceConfig(model="unused", max_queue=2, batch_wait_ms=0), engine=engine)
    with serve_in_thread(app) as url:
        _wait_ready(url)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*[client.post(f"{url}/v1/topk_logprobs", json=BODY) for _ in range(8)])

        statuses = sorted(r.status_code for r in asyncio.run(burst()))
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        refused = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "RateLimitError"
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.post(f"{url}/v1/topk_logprobs", json=BODY).status_code == 200


def test_api_key_is_required_and_never_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    secret = "s3cret-key-do-not-log"
    key_file = tmp_path / "key"
    key_file.write_text(secret + "\n")
    caplog.set_level(logging.DEBUG)
    app = create_app(ServiceConfig(model="unused", api_key_file=str(key_file)), engine=FakeEngine())
    with serve_in_thread(app) as url:
        _wait_ready(url)
        anon = httpx.get(f"{url}/v1/info")
        assert anon.status_code == 401 and anon.headers["www-authenticate"] == "Bearer"
        assert anon.json()["error"]["param"] == "authorization"
        wrong = httpx.post(f"{url}/v1/topk_logprobs", json=BODY, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.get(f"{url}/v1/info", headers={"authorization": f"Bearer {secret}"})
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200

        async def with_client(key: str | None):
            async with TeacherClient(url, api_key=key) as client:
                return await client.topk_logprobs([[1, 2, 3]], 2)

        assert asyncio.run(with_client(secret)).token_ids.shape == (2, 2)
        with pytest.raises(TeacherRequestError, match="401"):
            asyncio.run(with_client(None))
    assert secret not in caplog.text


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_API_KEY", "env-key")
    with serve_in_thread(create_app(ServiceConfig(model="unused"), engine=FakeEngine())) as url:
        _wait_ready(url)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer env-key"}).status_code == 200


def test_metrics_and_request_ids() -> None:
    with serve_in_thread(create_app(ServiceConfig(model="unused"), engine=FakeEngine())) as url:
        _wait_ready(url)
        r = httpx.post(f"{url}/v1/topk_logprobs", json=BODY, headers={"x-request-id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        assert len(httpx.get(f"{url}/health").headers["x-request-id"]) == 32
        httpx.post(f"{url}/v1/topk_logprobs", json={"sequences": [[1]], "top_k": 2})
        text = httpx.get(f"{url}/metrics").text
    assert 'gkd_teacher_requests_total{route="/v1/topk_logprobs",status="200"} 1.0' in text
    assert 'gkd_teacher_errors_total{type="BadRequestError"} 1.0' in text
    assert "gkd_teacher_rows_total 3.0" in text
    assert "gkd_teacher_tokens_total 4.0" in text
    assert "gkd_teacher_ready 1.0" in text
    assert "gkd_teacher_request_latency_seconds_bucket" in text and "gkd_teacher_batch_tokens_bucket" in text


def test_micro_batching_merges_concurrent_requests_and_routes_results(tiny_assets: TinyAssets) -> None:
    engine = HFEngine(tiny_assets.teacher, dtype="float32")
    app = create_app(ServiceConfig(model=str(tiny_assets.teacher), batch_wait_ms=20), engine=engine)
    gen = torch.Generator().manual_seed(3)
    seqs = [
        torch.randint(0, 500, (int(n),), generator=gen).tolist() for n in torch.randint(3, 40, (16,), generator=gen)
    ]
    ks = [2 + i % 5 for i in range(16)]
    # every third caller asks for two turns (row spans) instead of rows 1..: batch-mates may ask either way
    spans = [[(0, 1), (2, len(s) - 1)] if i % 3 == 0 and len(s) > 3 else [(1, len(s) - 1)] for i, s in enumerate(seqs)]
    with serve_in_thread(app) as url:
        _wait_ready(url, timeout=60)

        async def burst():
            async with TeacherClient(url) as client:
                await client.info()
                return await asyncio.gather(
                    *[
                        client.topk_logprobs(
                            [s],
                            k,
                            first_rows=None if i % 3 == 0 else [1],
                            row_spans=[spans[i]] if i % 3 == 0 else None,
                            logprobs_dtype="float32",
                            return_tail_logmass=bool(i % 2),
                        )
                        for i, (s, k) in enumerate(zip(seqs, ks, strict=True))
                    ]
                )

        frames = asyncio.run(burst())
        metrics = httpx.get(f"{url}/metrics").text
    engine_calls = float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("gkd_teacher_batch_requests_count"))
    )
    assert engine_calls < 16  # some requests shared a forward pass
    for i, (s, k, frame) in enumerate(zip(seqs, ks, frames, strict=True)):
        direct = engine.score_sync(ScoreJob([s], [spans[i]], k, want_tail_logmass=bool(i % 2)))
        assert frame.spans() == [spans[i]] and frame.has_spans == (i % 3 == 0)  # first_rows callers: format 1
        assert torch.equal(frame.token_ids, direct.token_ids)
        torch.testing.assert_close(frame.logprobs, direct.logprobs, atol=1e-5, rtol=0)
        assert (frame.tail_logmass is not None) == bool(i % 2)
        if i % 2:  # the tail is the mass outside this caller's k, whatever k its batch-mates asked for
            torch.testing.assert_close(frame.tail_logmass, direct.tail_logmass, atol=1e-5, rtol=0)


def test_sigterm_drains_in_flight_requests(tiny_assets: TinyAssets, tmp_path) -> None:
    proc = TeacherProcess(
        tiny_assets.teacher,
        extra_args=["--drain-timeout", "20", "--max-batch-tokens", "2048"],
        log_path=tmp_path / "teacher.log",
    ).start()
    try:
        gen = torch.Generator().manual_seed(0)
        big = {"sequences": torch.randint(0, 500, (96, 200), generator=gen).tolist(), "top_k": 8}
        result: dict[str, httpx.Response] = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("r", httpx.post(f"{proc.url}/v1/topk_logprobs", json=big, timeout=60))
        )
        thread.start()
        deadline = time.monotonic() + 30
        while "gkd_teacher_inflight_requests 1.0" not in httpx.get(f"{proc.url}/metrics").text:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.01)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        # uvicorn re-raises SIGTERM after its graceful shutdown, the conventional exit for a terminated process
        assert proc.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        resp = result["r"]
        assert resp.status_code == 200
        assert decode_frame(resp.content).token_ids.shape == (96 * 199, 8)
    finally:
        proc.stop()


def test_engine_failure_is_a_500_for_its_batch_and_the_service_recovers(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine(delay_s=0.05)
    with serve_in_thread(create_app(ServiceConfig(model="unused", batch_wait_ms=50), engine=engine)) as url:
        _wait_ready(url)
        engine.fail_next = True

        async def pair() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*[client.post(f"{url}/v1/topk_logprobs", json=BODY) for _ in range(2)])

        failed = asyncio.run(pair())
        assert [r.status_code for r in failed] == [500, 500]
        assert failed[0].json()["error"] == {
            "message": "internal error: RuntimeError",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
        assert httpx.post(f"{url}/v1/topk_logprobs", json=BODY).status_code == 200
    assert "simulated engine failure" in caplog.text


def test_json_logs_carry_the_request_id(tiny_assets: TinyAssets, tmp_path) -> None:
    log = tmp_path / "teacher.log"
    with TeacherProcess(tiny_assets.teacher, extra_args=["--log-format", "json"], log_path=log) as proc:
        r = httpx.post(f"{proc.url}/v1/topk_logprobs", json=BODY, headers={"x-request-id": "trace-42"})
        assert r.status_code == 200
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("request_id") == "trace-42"]
    assert access and access[0]["status"] == 200 and access[0]["route"] == "/v1/topk_logprobs"
    assert {"asctime", "levelname", "name", "message", "latency_ms"} <= access[0].keys()
    assert any(r["message"].startswith("engine transformers ready") for r in records)


def test_top_k_above_the_vocabulary_is_a_400_not_a_crash() -> None:
    app = create_app(ServiceConfig(model="unused", max_top_k=500), engine=FakeEngine(vocab=100))
    with serve_in_thread(app) as url:
        _wait_ready(url)
        r = httpx.post(f"{url}/v1/topk_logprobs", json={"sequences": [[1, 2, 3]], "top_k": 101})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
        assert "vocabulary size 100" in r.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/topk_logprobs", json={"sequences": [[1, 2, 3]], "top_k": 100}).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "prompt_logprobs": 101})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
