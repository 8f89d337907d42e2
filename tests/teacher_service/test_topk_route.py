"""A real uvicorn teacher on a loopback port, driven by the real client and by raw HTTP."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import torch

from demo.tiny import TinyAssets
from shared.codec import TopkFrame, decode_frame, encode_frame
from shared.protocol import TOPK_MEDIA_TYPE, RequestLimits, TeacherInfo
from student_trainer.teacher import TeacherClient
from student_trainer.teacher.errors import (
    TeacherMismatchError,
    TeacherProtocolError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.hf import HFEngine
from teacher_service.process import TeacherProcess, free_port

SEQS = [[5, 9, 14, 3, 8, 2], [7, 2, 11, 40], [30, 31]]


def _old_reader() -> ModuleType:
    """tests/shared/frame_v1.py: the format 1 reader old clients run (one copy, imported by name in tests/shared)."""
    if "frame_v1" not in sys.modules:  # registered before it runs: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("frame_v1", Path(__file__).parents[1] / "shared" / "frame_v1.py")
        assert spec is not None and spec.loader is not None
        sys.modules["frame_v1"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["frame_v1"])
    return sys.modules["frame_v1"]


frame_v1 = _old_reader()


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
    direct = engine.score_sync(ScoreJob.from_first_rows(SEQS, [2, 0, 0], 8, True, True))
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
        ({"sequences": [[1, 2, 3]], "top_k": 2, "row_spans": [[[0, 3]]]}, 400, "row_spans"),
        ({"sequences": [[1, 2, 3]], "top_k": 2, "row_spans": [[[1, 2], [0, 1]]]}, 400, "row_spans"),
        ({"sequences": [[1, 2, 3]], "top_k": 2, "row_spans": [[], []]}, 400, "row_spans"),
        ({"sequences": [[1, 2, 3]], "top_k": 2, "row_spans": [[[0, 1]]], "first_rows": [0]}, 400, "row_spans"),
        ({"sequences": [[1, 2, 3]], "top_k": 2, "row_spans": [[[0, "x"]]]}, 400, "row_spans[0][0][1]"),
        ({"sequences": [[1, 2, 3]], "top_k": 2, "row_spans": [[0, 1]]}, 400, "row_spans[0][0]"),
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


# --- row spans: only the rows of the loss (one span per assistant turn) on the wire

TURNS = [
    [5, 9, 14, 3, 8, 2, 40, 41, 42, 43, 19, 20, 7],
    [7, 2, 11, 40, 6, 6, 30],
    [30, 31, 32, 33],  # no span: no rows
    [4, 8, 15, 16, 23, 42, 99, 100, 101, 7, 3],
]
TURN_SPANS = [[(2, 4), (6, 9), (11, 12)], [(0, 1), (3, 6)], [], [(9, 10)]]
EQUAL_LENGTHS = [s[:7] for s in (TURNS[0], TURNS[1], TURNS[3], TURNS[0][5:])]  # one length: no padding
EQUAL_SPANS = [[(1, 3), (4, 6)], [], [(0, 6)], [(5, 6)]]


def _slice_rows(full: TopkFrame, spans: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Indices into a full frame (first_rows 0) of the rows ``spans`` names, in frame order."""
    return torch.cat(
        [
            torch.arange(int(full.row_offsets[b]) + s, int(full.row_offsets[b]) + e)
            for b, sp in enumerate(spans)
            for s, e in sp
        ]
    )


@pytest.mark.parametrize("seqs,spans", [(TURNS, TURN_SPANS), (EQUAL_LENGTHS, EQUAL_SPANS)], ids=["mixed", "equal"])
def test_span_rows_equal_the_same_rows_of_a_full_request(
    teacher_server: TeacherProcess, seqs: list[list[int]], spans: list[list[tuple[int, int]]]
) -> None:
    """Binary and JSON answers to a multi-span request hold exactly the full request's rows at the spans."""
    url = f"{teacher_server.url}/v1/topk_logprobs"
    base = {"sequences": seqs, "top_k": 6, "logprobs_dtype": "float32", "return_target_logprobs": True}
    body = {**base, "row_spans": [[list(span) for span in sp] for sp in spans], "return_tail_logmass": True}
    full = decode_frame(httpx.post(url, json={**base, "return_tail_logmass": True}).content)
    resp = httpx.post(url, json=body)
    assert resp.status_code == 200, resp.text
    frame = decode_frame(resp.content)
    assert frame.metadata["format_version"] == "2" and frame.spans() == spans
    assert frame.first_rows.tolist() == [sp[0][0] if sp else len(s) - 1 for s, sp in zip(seqs, spans, strict=True)]
    idx = _slice_rows(full, spans)
    assert frame.row_offsets[-1] == len(idx) < full.row_offsets[-1]
    assert torch.equal(frame.token_ids, full.token_ids[idx])
    for name in ("logprobs", "target_logprobs", "tail_logmass"):
        torch.testing.assert_close(getattr(frame, name), getattr(full, name)[idx], atol=1e-5, rtol=0)

    js = httpx.post(url, json=body, headers={"accept": "application/json"}).json()
    assert js["format_version"] == 2
    assert [s["row_spans"] for s in js["sequences"]] == [[list(span) for span in sp] for sp in spans]
    assert [s["first_row"] for s in js["sequences"]] == frame.first_rows.tolist()
    assert [len(s["token_ids"]) for s in js["sequences"]] == (frame.row_offsets[1:] - frame.row_offsets[:-1]).tolist()
    assert torch.equal(
        torch.tensor([r for s in js["sequences"] for r in s["token_ids"]], dtype=torch.int32), frame.token_ids
    )
    torch.testing.assert_close(torch.tensor([r for s in js["sequences"] for r in s["logprobs"]]), frame.logprobs)


def test_old_client_reads_a_new_teachers_answer_without_spans(teacher_server: TeacherProcess) -> None:
    """A request without row_spans is answered as before spans existed: the format 1 reader released before
    them (tests/shared/frame_v1.py) decodes it, and the JSON form is unchanged."""
    url = f"{teacher_server.url}/v1/topk_logprobs"
    body = {"sequences": SEQS, "top_k": 4, "first_rows": [2, 0, 0], "return_tail_logmass": True}
    resp = httpx.post(url, json=body)
    old = frame_v1.decode_frame(resp.content)
    new = decode_frame(resp.content)
    assert old.metadata["format_version"] == "1" and not new.has_spans
    assert old.row_offsets.tolist() == [0, 3, 6, 7] and old.first_rows.tolist() == [2, 0, 0]
    for name in ("token_ids", "logprobs", "row_offsets", "first_rows", "tail_logmass"):
        assert torch.equal(getattr(old, name), getattr(new, name)), name
    js = httpx.post(url, json=body, headers={"accept": "application/json"}).json()
    assert js["format_version"] == 1 and all("row_spans" not in s for s in js["sequences"])
    # the same rows asked for by spans come back as format 2, which the old reader refuses by its version
    spans = {**body, "first_rows": None, "row_spans": [[[2, 5]], [[0, 3]], [[0, 1]]]}
    resp = httpx.post(url, json=spans)
    with pytest.raises(frame_v1.FrameError, match="format_version '2'"):
        frame_v1.decode_frame(resp.content)
    assert torch.equal(decode_frame(resp.content).token_ids, new.token_ids)


def test_client_sends_spans_and_checks_them(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    async def go():
        async with TeacherClient(teacher_server.url) as client:
            return await client.topk_logprobs(
                TURNS, 8, row_spans=TURN_SPANS, logprobs_dtype="float32", return_target_logprobs=True
            )

    frame = run(go())
    direct = engine.score_sync(ScoreJob(TURNS, TURN_SPANS, 8, want_target_logprobs=True))
    assert frame.spans() == TURN_SPANS == direct.spans()
    assert frame.row_offsets.tolist() == [0, 6, 10, 10, 11]
    assert torch.equal(frame.token_ids, direct.token_ids)
    torch.testing.assert_close(frame.logprobs, direct.logprobs)
    torch.testing.assert_close(frame.target_logprobs, direct.target_logprobs)


def test_rows_metric_counts_rows_sent(teacher_server: TeacherProcess) -> None:
    def rows_total() -> float:
        text = httpx.get(f"{teacher_server.url}/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("gkd_teacher_rows_total")))

    before = rows_total()
    body = {"sequences": TURNS, "top_k": 2, "row_spans": [[list(span) for span in sp] for sp in TURN_SPANS]}
    assert httpx.post(f"{teacher_server.url}/v1/topk_logprobs", json=body).status_code == 200
    assert rows_total() - before == 11


def _mock_teacher(answer: TopkFrame, format_version: int = 2) -> httpx.MockTransport:
    info = TeacherInfo(
        model="m",
        vocab_size=1000,
        tokenizer_fingerprint="f",
        max_top_k=8,
        limits=RequestLimits(max_top_k=8, max_sequences=8, max_tokens=999, max_body_bytes=9999),
        engine="mock",
        format_version=format_version,
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/info":
            return httpx.Response(200, content=info.model_dump_json())
        return httpx.Response(200, content=encode_frame(answer), headers={"content-type": TOPK_MEDIA_TYPE})

    return httpx.MockTransport(handler)


def test_client_refuses_answers_with_other_spans_and_old_teachers() -> None:
    seqs, spans = [[1, 2, 3, 4, 5, 6]], [[(0, 1), (3, 5)]]
    ids, lps = torch.zeros(3, 2, dtype=torch.int32), torch.full((3, 2), -1.0)

    async def ask(answer: TopkFrame, format_version: int = 2) -> TopkFrame:
        async with TeacherClient("http://t", transport=_mock_teacher(answer, format_version)) as client:
            return await client.topk_logprobs(seqs, 2, row_spans=spans)

    good = TopkFrame.from_spans(ids, lps, spans, [6], metadata={"model": "m"})
    assert run(ask(good)).spans() == spans
    shifted = TopkFrame.from_spans(ids, lps, [[(0, 1), (2, 4)]], [6], metadata={"model": "m"})
    with pytest.raises(TeacherProtocolError, match=r"rows \[\(0, 1\), \(2, 4\)\] of sequence 0"):
        run(ask(shifted))
    block = TopkFrame(ids, lps, torch.tensor([0, 3]), torch.tensor([0]), metadata={"model": "m"})  # rows 0..2
    with pytest.raises(TeacherProtocolError, match="carries no spans"):
        run(ask(block))
    with pytest.raises(TeacherMismatchError, match="frame format 1, which has no row spans"):
        run(ask(good, format_version=1))


def test_packed_answers_hold_the_int32_rows_and_are_negotiated(teacher_server: TeacherProcess) -> None:
    info = httpx.get(f"{teacher_server.url}/v1/info").json()
    assert "packed" in info["ids_encodings"] and "q8" in info["logprobs_dtypes"]
    assert info["model_revision"].startswith("sampled-sha256:")
    sent: list[bytes] = []

    async def ask(ids_encoding: str, dtype: str = "float16") -> TopkFrame:
        async def hook(request: httpx.Request) -> None:
            sent.append(request.content)

        async with TeacherClient(teacher_server.url, ids_encoding=ids_encoding) as client:
            client._http.event_hooks["request"].append(hook)
            return await client.topk_logprobs(SEQS, 8, first_rows=[2, 0, 0], logprobs_dtype=dtype)

    plain, packed = run(ask("int32")), run(ask("auto"))
    assert b"ids_encoding" not in sent[-2] and b'"ids_encoding":"packed"' in sent[-1]
    assert packed.metadata["format_version"] == "3"
    assert torch.equal(plain.token_ids, packed.token_ids) and torch.equal(plain.logprobs, packed.logprobs)
    q8 = run(ask("packed", "q8"))
    assert torch.equal(q8.token_ids, plain.token_ids)
    assert (q8.logprobs - plain.logprobs.float()).abs().max() < 0.1


def test_an_old_teacher_is_never_asked_for_packed_ids() -> None:
    ids, lps = torch.zeros(5, 2, dtype=torch.int32), torch.full((5, 2), -1.0)
    answer = TopkFrame(ids, lps, torch.tensor([0, 5]), torch.tensor([0]), metadata={"model": "m"})
    bodies: list[bytes] = []
    old = _mock_teacher(answer)  # its handshake names no ids_encodings: int32 only

    def recording(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return old.handler(request)

    async def ask(ids_encoding: str) -> TopkFrame:
        async with TeacherClient("http://t", ids_encoding=ids_encoding, transport=httpx.MockTransport(recording)) as c:
            return await c.topk_logprobs([[1, 2, 3, 4, 5, 6]], 2)

    assert run(ask("auto")).top_k == 2 and b"ids_encoding" not in bodies[-1]
    with pytest.raises(TeacherMismatchError, match="not 'packed'"):
        run(ask("packed"))


def test_a_teacher_refuses_an_unknown_encoding_naming_the_field(teacher_server: TeacherProcess) -> None:
    body = {"sequences": SEQS, "top_k": 2, "ids_encoding": "zstd"}
    resp = httpx.post(f"{teacher_server.url}/v1/topk_logprobs", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "ids_encoding"
