"""A real uvicorn teacher on a loopback port, driven by the real client and by raw HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from demo.tiny import TinyAssets
from shared.protocol import TOPK_MEDIA_TYPE
from student_trainer.teacher import TeacherClient
from student_trainer.teacher.errors import (
    TeacherMismatchError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.hf import HFEngine
from teacher_service.process import TeacherProcess, free_port

SEQS = [[5, 9, 14, 3, 8, 2], [7, 2, 11, 40], [30, 31]]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def engine(tiny_assets: TinyAssets) -> HFEngine:
    eng = HFEngine(tiny_assets.teacher)
    eng.load()
    return eng


def test_health_models_and_info(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    assert httpx.get(f"{teacher_server.url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{teacher_server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "teacher"
    info = httpx.get(f"{teacher_server.url}/v1/info").json()
    assert info["vocab_size"] == engine.vocab_size
    assert info["tokenizer_fingerprint"] == engine.tokenizer_fingerprint
    assert info["max_top_k"] == 32 and info["logprob_mode"] == "raw"


def test_client_rows_equal_engine_rows(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    async def go():
        async with TeacherClient(teacher_server.url) as client:
            return await client.topk_logprobs(
                SEQS,
                8,
                first_rows=[2, 0, 0],
                logprobs_dtype="float32",
                return_target_logprobs=True,
                return_tail_logmass=True,
            )

    frame = run(go())
    direct = engine.score_sync(ScoreJob(SEQS, [2, 0, 0], 8, True, True))
    assert frame.row_offsets.tolist() == [0, 3, 6, 7]
    assert torch.equal(frame.token_ids, direct.token_ids)
    torch.testing.assert_close(frame.logprobs, direct.logprobs)
    torch.testing.assert_close(frame.target_logprobs, direct.target_logprobs)
    torch.testing.assert_close(frame.tail_logmass, direct.tail_logmass)


def test_json_answer_matches_binary(teacher_server: TeacherProcess) -> None:
    body = {"sequences": SEQS, "top_k": 4, "logprobs_dtype": "float32"}
    js = httpx.post(f"{teacher_server.url}/v1/topk_logprobs", json=body, headers={"accept": "application/json"})
    assert js.status_code == 200 and js.headers["content-type"] == "application/json"
    binary = httpx.post(f"{teacher_server.url}/v1/topk_logprobs", json=body)
    assert binary.headers["content-type"] == TOPK_MEDIA_TYPE
    from shared.codec import decode_frame

    frame = decode_frame(binary.content)
    seqs = js.json()["sequences"]
    assert [len(s["token_ids"]) for s in seqs] == [5, 3, 1]
    assert torch.equal(torch.tensor([r for s in seqs for r in s["token_ids"]], dtype=torch.int32), frame.token_ids)
    got = torch.tensor([r for s in seqs for r in s["logprobs"]])
    torch.testing.assert_close(got, frame.logprobs)


def test_client_caches_handshake_per_instance(teacher_server: TeacherProcess) -> None:
    calls: list[str] = []

    async def go():
        async def hook(request: httpx.Request) -> None:
            calls.append(request.url.path)

        a, b = TeacherClient(teacher_server.url), TeacherClient(teacher_server.url)
        a._http.event_hooks["request"].append(hook)
        b._http.event_hooks["request"].append(hook)
        try:
            for _ in range(3):
                await a.topk_logprobs([[1, 2, 3]], 2)
            await b.topk_logprobs([[1, 2, 3]], 2)
            return await a.model_name(), await b.model_name()
        finally:
            await a.aclose()
            await b.aclose()

    names = run(go())
    assert names == ("teacher", "teacher")
    assert calls.count("/v1/info") == 2  # once per client instance, not once per process or per call
    assert calls.count("/v1/topk_logprobs") == 4


def test_handshake_refuses_other_tokenizer(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    async def go(fingerprint: str, vocab: int, k: int):
        async with TeacherClient(teacher_server.url) as client:
            return await client.check_compatible(vocab, fingerprint, k)

    assert run(go(engine.tokenizer_fingerprint, engine.vocab_size, 8)).model == "teacher"
    with pytest.raises(TeacherMismatchError, match=r"sha256:other.*|.*sha256:other") as err:
        run(go("sha256:other", engine.vocab_size, 8))
    assert engine.tokenizer_fingerprint in str(err.value)
    with pytest.raises(TeacherMismatchError, match="vocabulary size"):
        run(go(engine.tokenizer_fingerprint, engine.vocab_size + 1, 8))
    with pytest.raises(TeacherMismatchError, match="top_k"):
        run(go(engine.tokenizer_fingerprint, engine.vocab_size, 33))


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"sequences": [], "top_k": 2}, 400, "sequences"),
        ({"sequences": [[1]], "top_k": 2}, 400, "sequences"),
        ({"sequences": [[]], "top_k": 2}, 400, "sequences"),
        ({"sequences": [[1, 2]]}, 400, "top_k"),
        ({"sequences": [[1, 2]], "top_k": "many"}, 400, "top_k"),
        ({"sequences": "1 2 3", "top_k": 2}, 400, "sequences"),
        ({"sequences": [[1, "x"]], "top_k": 2}, 400, "sequences[0][1]"),
        ({"sequences": [[1, 2, True]], "top_k": 2}, 400, "sequences[0][2]"),
        ({"sequences": [[1, 2.0]], "top_k": 2}, 400, "sequences[0][1]"),
        ({"sequences": [[1, -3]], "top_k": 2}, 400, "sequences[0]"),
        ({"sequences": [[1, 10**6]], "top_k": 2}, 400, "sequences[0]"),
        ({"sequences": [[1, 2]], "top_k": 0}, 400, "top_k"),
        ({"sequences": [[1, 2]], "top_k": 33}, 400, "top_k"),
        ({"sequences": [[1, 2, 3]], "top_k": 2, "first_rows": [2]}, 400, "first_rows"),
        ({"sequences": [[1, 2, 3]], "top_k": 2, "first_rows": [0, 0]}, 400, "first_rows"),
        ({"sequences": [[1, 2]], "top_k": 2, "model": "other"}, 404, "model"),
        ({"sequences": [[1, 2]], "top_k": 2, "surprise": 1}, 400, "surprise"),
        ({"sequences": [[1, 2]] * 65, "top_k": 2}, 413, "sequences"),
        ({"sequences": [[1] * 200] * 30, "top_k": 2}, 413, "sequences"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(
    teacher_server: TeacherProcess, body: dict, status: int, param: str | None
) -> None:
    resp = httpx.post(f"{teacher_server.url}/v1/topk_logprobs", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param
    assert httpx.get(f"{teacher_server.url}/health").status_code == 200


def test_malformed_bodies(teacher_server: TeacherProcess) -> None:
    url = f"{teacher_server.url}/v1/topk_logprobs"
    resp = httpx.post(url, content=b'{"sequences": [[1,2]', headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    resp = httpx.post(url, content=b"sequences=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 415 and resp.json()["error"]["param"] == "content-type"
    resp = httpx.post(url, content=b"[" + b"1," * 40000 + b"1]", headers={"content-type": "application/json"})
    assert resp.status_code == 413

    def chunked():  # no Content-Length: the limit applies while streaming
        yield b'{"sequences": [['
        for _ in range(2000):
            yield b"1," * 50
        yield b'1]], "top_k": 2}'

    resp = httpx.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "exceeds the limit" in resp.json()["error"]["message"]
    assert httpx.get(f"{teacher_server.url}/nope").json()["error"]["code"] == 404


def test_client_raises_typed_errors_never_fills(teacher_server: TeacherProcess) -> None:
    async def bad_k():
        async with TeacherClient(teacher_server.url) as client:
            await client.topk_logprobs([[1, 2, 3]], 64)

    with pytest.raises(TeacherRequestError) as err:
        run(bad_k())
    assert err.value.status == 400 and err.value.param == "top_k"

    async def unreachable():
        async with TeacherClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff_base=0.01) as client:
            await client.topk_logprobs([[1, 2, 3]], 2)

    with pytest.raises(TeacherUnavailableError, match="unreachable after 3 attempts"):
        run(unreachable())


def test_client_retries_transient_statuses_then_gives_up() -> None:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        if request.url.path == "/v1/info" and len(seen) < 3:
            return httpx.Response(503, headers={"retry-after": "0"}, json={"error": {"message": "warming up"}})
        return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "busy"}})

    async def go():
        async with TeacherClient("http://teacher", transport=httpx.MockTransport(handler), max_retries=2) as c:
            await c.info()

    with pytest.raises(TeacherUnavailableError, match="busy"):
        run(go())
    assert len(seen) == 3
