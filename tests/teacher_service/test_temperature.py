"""Teacher temperature: rows at log_softmax(logits / T) with the exact tail, over HTTP and through the trainer.

The native request's ``temperature`` on the transformers engine (the engine-level equality with the full
logits is in test_hidden_state_scoring.py), its checks, micro-batches that mix temperatures, the refusal of
a temperature on ``/v1/completions`` prompt log-probs (stock vLLM computes them at T = 1 whatever the
request says), and the trainer asking for its loss temperature and using the rows as they come.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
import torch
from support import serve_in_thread

from demo.tiny import TinyAssets
from shared.alignment import pad_sequences
from shared.codec import decode_frame
from student_trainer.loss import gkd_topk_loss
from student_trainer.teacher import TeacherClient
from student_trainer.teacher.errors import TeacherMismatchError
from teacher_service.app import create_app
from teacher_service.config import ServiceConfig
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.hf import HFEngine
from teacher_service.process import TeacherProcess

SEQS = [[5, 9, 14, 3, 8, 2, 40, 41], [7, 2, 11, 40]]


@pytest.fixture(scope="module")
def engine(tiny_assets: TinyAssets) -> HFEngine:
    eng = HFEngine(tiny_assets.teacher)
    eng.load()
    return eng


def test_rows_at_the_requested_temperature(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    assert httpx.get(f"{teacher_server.url}/v1/info").json()["applies_temperature"] is True

    async def ask(t: float):
        async with TeacherClient(teacher_server.url) as client:
            return await client.topk_logprobs(
                SEQS, 8, logprobs_dtype="float32", return_tail_logmass=True, temperature=t
            )

    hot, raw = asyncio.run(ask(2.0)), asyncio.run(ask(1.0))
    direct = engine.score_sync(ScoreJob.from_first_rows(SEQS, [0, 0], 8, False, True, temperature=2.0))
    assert hot.metadata["temperature"] == "2.0" and raw.metadata["temperature"] == "1.0"
    assert torch.equal(hot.token_ids, direct.token_ids) and torch.equal(hot.token_ids, raw.token_ids)
    torch.testing.assert_close(hot.logprobs, direct.logprobs, atol=1e-5, rtol=0)
    assert hot.tail_logmass is not None and direct.tail_logmass is not None and raw.tail_logmass is not None
    torch.testing.assert_close(hot.tail_logmass, direct.tail_logmass, atol=1e-5, rtol=0)
    # a hotter softmax is flatter: less mass on the top-1, more in the tail, on every row
    assert bool((hot.logprobs[:, 0] < raw.logprobs[:, 0]).all()) and bool((hot.tail_logmass > raw.tail_logmass).all())
    # each row is still a distribution: top-k mass plus tail mass is one
    total = torch.logsumexp(torch.cat([hot.logprobs, hot.tail_logmass.unsqueeze(-1)], dim=-1), dim=-1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)

    as_json = httpx.post(
        f"{teacher_server.url}/v1/topk_logprobs",
        json={"sequences": SEQS, "top_k": 3, "temperature": 2.0},
        headers={"accept": "application/json"},
    ).json()
    assert as_json["temperature"] == 2.0
    assert as_json["sequences"][0]["logprobs"][0] == pytest.approx(direct.logprobs[0, :3].tolist(), abs=2e-3)


@pytest.mark.parametrize("bad", [0, -1.0, "hot"])
def test_bad_temperature_is_refused_naming_the_field(teacher_server: TeacherProcess, bad: object) -> None:
    r = httpx.post(f"{teacher_server.url}/v1/topk_logprobs", json={"sequences": SEQS, "top_k": 3, "temperature": bad})
    assert r.status_code in (400, 422)
    assert "temperature" in r.json()["error"]["param"]


def test_completions_refuse_a_temperature_their_prompt_logprobs_would_not_have(teacher_server: TeacherProcess) -> None:
    url = f"{teacher_server.url}/v1/completions"
    body = {"prompt": SEQS[0], "max_tokens": 1, "prompt_logprobs": 3}
    refused = httpx.post(url, json={**body, "temperature": 0.7})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "temperature" and "temperature 1" in refused.json()["error"]["message"]
    # 0 (greedy, what the seed and most scoring clients send) and 1 answer raw rows, as vLLM does
    zero = httpx.post(url, json={**body, "temperature": 0}).json()["choices"][0]["prompt_logprobs"]
    one = httpx.post(url, json={**body, "temperature": 1.0}).json()["choices"][0]["prompt_logprobs"]
    assert zero == one and len(zero) == len(SEQS[0])
    # without prompt_logprobs a temperature asks nothing of the log-probs
    assert httpx.post(url, json={"prompt": SEQS[0], "max_tokens": 1, "temperature": 0.7}).status_code == 200


def test_micro_batch_mixing_temperatures_gives_each_caller_its_own(tiny_assets: TinyAssets, engine: HFEngine) -> None:
    app = create_app(
        ServiceConfig(model=str(tiny_assets.teacher), batch_wait_ms=30), engine=HFEngine(tiny_assets.teacher)
    )
    temps = [1.0, 0.5, 1.0, 3.0, 0.5, 1.0]
    with serve_in_thread(app) as url:
        for _ in range(100):
            if httpx.get(f"{url}/ready").status_code == 200:
                break
            asyncio.run(asyncio.sleep(0.1))

        async def burst():
            async with TeacherClient(url) as client:
                await client.info()
                return await asyncio.gather(
                    *[
                        client.topk_logprobs([SEQS[i % 2]], 4, logprobs_dtype="float32", temperature=t)
                        for i, t in enumerate(temps)
                    ]
                )

        frames = asyncio.run(burst())
    for i, (t, frame) in enumerate(zip(temps, frames, strict=True)):
        direct = engine.score_sync(ScoreJob.from_first_rows([SEQS[i % 2]], [0], 4, temperature=t))
        torch.testing.assert_close(frame.logprobs, direct.logprobs, atol=1e-5, rtol=0)


def test_binary_frame_says_its_temperature(teacher_server: TeacherProcess) -> None:
    r = httpx.post(f"{teacher_server.url}/v1/topk_logprobs", json={"sequences": SEQS, "top_k": 2, "temperature": 0.25})
    assert decode_frame(r.content).metadata["temperature"] == "0.25"


def test_tail_loss_with_tempered_teacher_rows_equals_the_full_vocabulary_reference() -> None:
    """Rows at T with their exact tail: the tail-class loss at T is the JSD over (top-k ids, rest) of the
    tempered full distributions, which raw rows cannot give (their tail is known at T = 1 only)."""
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 40) * 2, torch.randn(5, 40) * 2
    t, k, beta = 0.6, 6, 0.5
    t_log = torch.log_softmax(teacher.double() / t, dim=-1)
    lp, ids = t_log.topk(k, dim=-1)
    tail = torch.logsumexp(t_log.scatter(-1, ids, -math.inf), dim=-1)
    got = gkd_topk_loss(
        student, ids, lp.float(), beta, t, "tail", teacher_tail_logmass=tail.float(), teacher_tempered=True
    )
    s_log = torch.log_softmax(student.double() / t, dim=-1)
    s = torch.cat([s_log.gather(-1, ids), torch.logsumexp(s_log.scatter(-1, ids, -math.inf), dim=-1, keepdim=True)], -1)
    q = torch.cat([lp, tail.unsqueeze(-1)], -1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), q + math.log(beta)]), dim=0)
    ref = beta * (q.exp() * (q - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        gkd_topk_loss(student, ids, lp.float(), beta, t, "tail", teacher_tail_logmass=tail.float())
    # renorm: rows at T used as they are equal raw rows tempered by the loss
    raw_lp = torch.log_softmax(teacher.double(), dim=-1).gather(-1, ids).float()
    at_t = gkd_topk_loss(student, ids, lp.float(), beta, t, "renorm", teacher_tempered=True)
    torch.testing.assert_close(at_t, gkd_topk_loss(student, ids, raw_lp, beta, t, "renorm"), atol=1e-5, rtol=1e-4)


def test_client_refuses_a_temperature_the_teacher_does_not_apply(teacher_server: TeacherProcess) -> None:
    async def ask() -> None:
        async with TeacherClient(teacher_server.url) as client:
            info = await client.info()
            client._info = info.model_copy(update={"applies_temperature": False, "engine": "vllm"})
            await client.topk_logprobs(SEQS, 2, temperature=0.5)

    with pytest.raises(TeacherMismatchError, match="temperature 1 only"):
        asyncio.run(ask())


def test_trainer_asks_for_its_loss_temperature(
    teacher_server: TeacherProcess, tiny_assets: TinyAssets, tmp_path
) -> None:
    """--temperature 0.5 --tail tail against a teacher that applies temperature: the rows come at 0.5 and the
    loss uses them as they are."""
    from transformers import AutoTokenizer

    from student_trainer.config import TrainerConfig
    from student_trainer.data.batch import Batch
    from student_trainer.teacher import ServiceTeacher, open_teacher
    from student_trainer.teacher.rows import TopkRows

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer)
    config = TrainerConfig(
        model_name_or_path="m",
        dataset="t.jsonl",
        output_dir=str(tmp_path),
        max_steps=1,
        deepspeed_config="ds.json",
        teacher_url=teacher_server.url,
        temperature=0.5,
        tail="tail",
        top_k=4,
    )
    teacher = open_teacher(config, tokenizer, len(tokenizer))
    try:
        assert isinstance(teacher, ServiceTeacher) and teacher.temperature == 0.5
        ids, mask = pad_sequences(SEQS, pad_id=0)
        batch = Batch(ids, mask, [[(2, 7)], [(0, 3)]], SEQS)
        rows = teacher.request(batch).result()
        assert isinstance(rows, TopkRows) and rows.tempered and rows.frame.metadata["temperature"] == "0.5"
        student = torch.randn(batch.num_target_tokens, len(tokenizer))
        loss = rows.gkd_loss(student, config.loss)  # the tail class at T = 0.5: refused for raw rows
        assert loss.shape == (batch.num_target_tokens,) and bool(torch.isfinite(loss).all())
    finally:
        teacher.close()


def test_trainer_refuses_tail_at_temperature_from_a_teacher_at_temperature_1(
    teacher_server: TeacherProcess, tiny_assets: TinyAssets, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A teacher whose handshake says it computes temperature 1 only (the vLLM engine): --tail tail at
    --temperature 0.5 is refused before step 1, --tail renorm gets raw rows the loss tempers."""
    from transformers import AutoTokenizer

    from student_trainer.config import TrainerConfig
    from student_trainer.teacher import ServiceTeacher, open_teacher

    real_info = TeacherClient.info

    async def vllm_like(self: TeacherClient):
        info = await real_info(self)
        return info.model_copy(update={"applies_temperature": False, "engine": "vllm"})

    monkeypatch.setattr(TeacherClient, "info", vllm_like)
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer)
    common = {
        "model_name_or_path": "m",
        "dataset": "t.jsonl",
        "output_dir": str(tmp_path),
        "max_steps": 1,
        "deepspeed_config": "ds.json",
        "teacher_url": teacher_server.url,
        "temperature": 0.5,
        "top_k": 4,
    }
    with pytest.raises(TeacherMismatchError, match=r"--tail tail at --temperature 0\.5"):
        open_teacher(TrainerConfig(**common, tail="tail"), tokenizer, len(tokenizer))
    teacher = open_teacher(TrainerConfig(**common, tail="renorm"), tokenizer, len(tokenizer))
    try:
        assert isinstance(teacher, ServiceTeacher) and teacher.temperature == 1.0
    finally:
        teacher.close()
