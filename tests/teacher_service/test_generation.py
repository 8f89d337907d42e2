"""Teacher generation through `/v1/completions` (max_tokens > 1) on the transformers engine, with the official
``openai`` client against a real uvicorn service; the same checks run on the vLLM engine in test_vllm_engine.py."""

from __future__ import annotations

import threading

import httpx
import pytest
from generation_checks import RANDOM_PROMPT, check_openai_generation

from demo.tiny import TinyAssets
from teacher_service.engines.generation import GenerateJob
from teacher_service.engines.hf import HFEngine
from teacher_service.engines.hf_generate import GenerationCancelled
from teacher_service.process import TeacherProcess


@pytest.fixture(scope="module")
def engine(tiny_assets: TinyAssets) -> HFEngine:
    eng = HFEngine(tiny_assets.teacher, dtype="float32", max_batch_tokens=64)
    eng.load()
    return eng


def test_openai_client_generation(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    assert engine._model is not None
    before = _generated_tokens(teacher_server.url)
    check_openai_generation(teacher_server.url, engine._model, engine.tokenizer, engine.max_model_len)
    assert _generated_tokens(teacher_server.url) > before


def test_prompt_logprobs_alongside_generation(teacher_server: TeacherProcess) -> None:
    """One request may score its prompt and generate; an absent max_tokens is vLLM's 16."""
    body = {"prompt": RANDOM_PROMPT, "prompt_logprobs": 2, "ignore_eos": True, "return_token_ids": True}
    resp = httpx.post(f"{teacher_server.url}/v1/completions", json=body, timeout=60).json()
    (choice,) = resp["choices"]
    assert len(choice["prompt_logprobs"]) == len(RANDOM_PROMPT) and choice["prompt_logprobs"][0] is None
    assert len(choice["token_ids"]) == 16 and choice["finish_reason"] == "length"
    assert resp["usage"]["completion_tokens"] == 16


def test_batched_chunks_match_one_prompt_at_a_time(engine: HFEngine) -> None:
    """Left-padded prompts of different lengths, split into row chunks by the token budget, greedy as alone."""
    prompts = [RANDOM_PROMPT, RANDOM_PROMPT[:2], [5, 9, 14, 3, 8, 2, 7, 11, 19]]
    job = GenerateJob(prompts, max_tokens=8, temperature=0, ignore_eos=True)
    together = engine.generate_sync(job)
    for prompt, (alone,) in zip(prompts, together, strict=True):
        (single,) = engine.generate_sync(GenerateJob([prompt], max_tokens=8, temperature=0, ignore_eos=True))[0]
        assert alone.token_ids == single.token_ids and len(alone.token_ids) == 8


def test_cancelled_generation_stops(engine: HFEngine) -> None:
    """A cancelled request's worker stops at the next token and lets go of the model."""
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        engine.generate_sync(GenerateJob([RANDOM_PROMPT], max_tokens=200, ignore_eos=True), cancel)
    assert engine._lock.acquire(blocking=False)
    engine._lock.release()


def _generated_tokens(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("gkd_teacher_generated_tokens_total"):
            return float(line.split()[-1])
    raise AssertionError("no gkd_teacher_generated_tokens_total in /metrics")


def test_generation_past_the_token_limit_is_413(teacher_server: TeacherProcess) -> None:
    """Prompts plus n x max_tokens count against --max-tokens (4096 here), before any work."""
    body = {"prompt": [RANDOM_PROMPT] * 10, "max_tokens": 200, "n": 3}
    resp = httpx.post(f"{teacher_server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 413 and resp.json()["error"]["param"] == "max_tokens", resp.text
