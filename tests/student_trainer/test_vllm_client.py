"""The vLLM-API teacher client against a mock server emitting vLLM's exact /v1/completions JSON shape."""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path

import httpx
import orjson
import pytest
import torch
from support import REPO, failure_output, launch, read_jsonl

from demo.tiny import TinyAssets
from student_trainer.teacher import make_client
from student_trainer.teacher.errors import TeacherMismatchError, TeacherProtocolError, TeacherUnavailableError
from student_trainer.teacher.vllm import VllmTeacherClient, parse_prompt_logprobs
from teacher_service.process import TeacherProcess

VOCAB = 40
MAX_LOGPROBS = 20  # stock vLLM's --max-logprobs default
PROBE_TEXT, PROBE_IDS = "probe", [7, 3, 9]


def teacher_logprobs(prefix: list[int]) -> torch.Tensor:
    """A deterministic 'teacher': log-softmax over VOCAB from the last token, some ids impossible (-inf)."""
    gen = torch.Generator().manual_seed(1000 + prefix[-1])
    logits = torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 3
    logits[(prefix[-1] % 5) :: 11] = float("-inf")
    return torch.log_softmax(logits, -1)


def vllm_entry(lp: torch.Tensor, actual: int, k: int) -> dict[str, dict]:
    """One prompt_logprobs entry as vLLM builds it: actual token first, then the top-k by rank."""

    def item(tok: int) -> dict:
        value = float(lp[tok])
        rank = int((lp > lp[tok]).sum()) + 1
        return {"logprob": -9999.0 if value == float("-inf") else value, "rank": rank, "decoded_token": f"<{tok}>"}

    top = torch.topk(lp, k).indices.tolist()
    entry = {str(actual): item(actual)}
    for r, tok in enumerate(top, 1):
        entry[str(tok)] = {**item(tok), "rank": r}  # overwrites the actual token's value, keeps it first
    return entry


class MockVllm:
    def __init__(self, tokenize: list[int] | None = None) -> None:
        self.tokenize = PROBE_IDS if tokenize is None else tokenize
        self.requests: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "big-teacher", "max_model_len": 64}]})
        body = json.loads(request.content)
        self.requests.append(body)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": self.tokenize, "count": 3, "max_model_len": 64})
        k = body["prompt_logprobs"]
        if k > MAX_LOGPROBS:
            msg = f"Requested prompt logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"
            return httpx.Response(400, json={"error": {"message": msg, "type": "BadRequestError", "code": 400}})
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            entries = [None] + [
                vllm_entry(teacher_logprobs(prompt[: j + 1]), prompt[j + 1], k) for j in range(len(prompt) - 1)
            ]
            choices.append(
                {"index": i, "text": "x", "logprobs": None, "finish_reason": "length", "prompt_logprobs": entries}
            )
        random.Random(0).shuffle(choices)  # the client must order by `index`
        return httpx.Response(
            200, content=orjson.dumps({"id": "cmpl-1", "object": "text_completion", "choices": choices})
        )


def run(coro):
    return asyncio.run(coro)


SEQS = [[5, 9, 14, 3, 8, 2], [7, 2, 11, 30], [30, 31]]


@pytest.mark.parametrize("k", [4, 20])
def test_rows_equal_the_teacher_topk_with_targets_and_inf(k: int) -> None:
    async def go():
        async with VllmTeacherClient("http://vllm", transport=httpx.MockTransport(MockVllm())) as client:
            return await client.topk_logprobs(SEQS, k, first_rows=[2, 0, 0], return_target_logprobs=True)

    frame = run(go())
    assert frame.row_offsets.tolist() == [0, 3, 6, 7] and frame.first_rows.tolist() == [2, 0, 0]
    assert not frame.has_spans  # asked by first_rows: the format 1 layout, as before spans
    r = 0
    saw_inf = False
    for seq, first in zip(SEQS, [2, 0, 0], strict=True):
        for j in range(first, len(seq) - 1):
            lp = teacher_logprobs(seq[: j + 1])
            vals, ids = torch.topk(lp, k)
            assert frame.token_ids[r].tolist() == ids.tolist()
            torch.testing.assert_close(frame.logprobs[r].double(), vals, rtol=0, atol=1e-6)
            torch.testing.assert_close(frame.target_logprobs[r].double(), lp[seq[j + 1]], rtol=0, atol=1e-6)
            saw_inf |= bool(torch.isneginf(frame.logprobs[r]).any() or torch.isneginf(frame.target_logprobs[r]))
            r += 1
    assert r == 7
    assert saw_inf or k == 4  # with k=20 of 40 ids, some -9999.0 entries must have become -inf


def test_row_spans_keep_only_the_span_rows_and_send_no_more_than_needed() -> None:
    """vLLM can only send prompt log-probs of whole prompts: each sequence goes up to its last span's last
    label, a sequence without spans not at all, and the frame carries the spans as the teacher service's does."""
    seqs = [*SEQS, [4, 8, 15, 16, 23, 32, 11, 12]]
    spans = [[(1, 2), (3, 4)], [], [(0, 1)], [(2, 3), (5, 7)]]
    mock = MockVllm()

    async def go(row_spans):
        async with VllmTeacherClient("http://vllm", transport=httpx.MockTransport(mock)) as client:
            return await client.topk_logprobs(seqs, 4, row_spans=row_spans, return_target_logprobs=True)

    frame = run(go(spans))
    assert mock.requests[-1]["prompt"] == [SEQS[0][:5], SEQS[2], seqs[3]]
    assert frame.spans() == spans and frame.metadata == {"model": "big-teacher"}
    assert frame.row_offsets.tolist() == [0, 2, 2, 3, 6] and frame.first_rows.tolist() == [1, 3, 0, 2]
    rows = [(seq, j) for seq, sp in zip(seqs, spans, strict=True) for s, e in sp for j in range(s, e)]
    for r, (seq, j) in enumerate(rows):
        lp = teacher_logprobs(seq[: j + 1])
        vals, ids = torch.topk(lp, 4)
        assert frame.token_ids[r].tolist() == ids.tolist()
        torch.testing.assert_close(frame.logprobs[r].double(), vals, rtol=0, atol=1e-6)
        torch.testing.assert_close(frame.target_logprobs[r].double(), lp[seq[j + 1]], rtol=0, atol=1e-6)
    sent = len(mock.requests)
    empty = run(go([[], [], [], []]))
    assert len(mock.requests) == sent  # nothing to score: nothing sent
    assert empty.token_ids.shape == (0, 4) and empty.spans() == [[], [], [], []]
    with pytest.raises(ValueError, match=r"row_spans\[1\]"):
        run(go([[], [(0, 4)], [], []]))


def test_handshake_checks_tokenizer_and_max_logprobs() -> None:
    async def check(mock: MockVllm, k: int):
        async with make_client("vllm", "http://vllm", transport=httpx.MockTransport(mock)) as client:
            return await client.check_compatible(VOCAB, "sha256:unused", k, probe=(PROBE_TEXT, PROBE_IDS))

    assert run(check(MockVllm(), 20)).model == "big-teacher"
    with pytest.raises(TeacherMismatchError, match=r"--top_k 21.*--max-logprobs 21"):
        run(check(MockVllm(), 21))
    with pytest.raises(TeacherMismatchError, match="tokenizer mismatch"):
        run(check(MockVllm(tokenize=[7, 3, 10]), 8))


def test_malformed_answers_are_protocol_errors_never_filled() -> None:
    good = orjson.loads(
        MockVllm()(
            httpx.Request("POST", "http://v/v1/completions", json={"prompt": [[1, 2, 3]], "prompt_logprobs": 3})
        ).content
    )
    entry = good["choices"][0]["prompt_logprobs"][1]
    first_key = next(iter(entry))
    bad_token = {
        **good,
        "choices": [
            {
                **good["choices"][0],
                "prompt_logprobs": [None, {"39": entry[first_key]}, good["choices"][0]["prompt_logprobs"][2]],
            }
        ],
    }
    with pytest.raises(TeacherProtocolError):
        parse_prompt_logprobs(orjson.dumps(bad_token), [[1, 2, 3]], [0], 3)
    short = {**good, "choices": [{**good["choices"][0], "prompt_logprobs": [None]}]}
    with pytest.raises(TeacherProtocolError, match="entries for 3 tokens"):
        parse_prompt_logprobs(orjson.dumps(short), [[1, 2, 3]], [0], 3)
    with pytest.raises(TeacherProtocolError, match="choice"):
        parse_prompt_logprobs(orjson.dumps({"choices": []}), [[1, 2, 3]], [0], 3)
    frame, _ = parse_prompt_logprobs(orjson.dumps(good), [[1, 2, 3]], [0], 3)
    assert frame.token_ids.shape == (2, 3)


def test_vllm_teacher_down_raises_typed_error() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def go():
        async with VllmTeacherClient(
            "http://vllm", transport=httpx.MockTransport(down), max_retries=1, backoff_base=0.01
        ) as c:
            await c.topk_logprobs([[1, 2]], 2)

    with pytest.raises(TeacherUnavailableError, match="unreachable after 2 attempts"):
        run(go())


@pytest.mark.slow
def test_trainer_against_the_services_vllm_compatible_api(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path: Path
) -> None:
    """`--teacher_api vllm` end to end against the teacher's /tokenize and /v1/completions (vLLM's JSON shape):
    handshake by tokenization and a k probe, rows parsed by rank, finite losses."""
    args = ["--teacher_url", teacher_server.url, "--teacher_api", "vllm", "--top_k", "8", "--max_steps", "3"]
    args += ["--logging_steps", "1", "--deepspeed", str(REPO / "deploy" / "ds_zero0.json"), "--no_export"]
    proc = launch(tiny_assets, tmp_path, *args, ranks=1)
    assert proc.returncode == 0, failure_output(proc)
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
