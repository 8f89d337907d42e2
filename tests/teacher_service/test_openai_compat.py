"""`/v1/completions` with `prompt_logprobs` answers in vLLM's JSON shape: stock clients work unchanged."""

from __future__ import annotations

import httpx
import openai
import pytest

from demo.tiny import TinyAssets
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.hf import HFEngine
from teacher_service.process import TeacherProcess

PROMPTS = [[5, 9, 14, 3, 8, 2], [7, 2, 11], [42]]


@pytest.fixture(scope="module")
def engine(tiny_assets: TinyAssets) -> HFEngine:
    eng = HFEngine(tiny_assets.teacher)
    eng.load()
    return eng


def _check_against_engine(choices: list, engine: HFEngine, k: int) -> None:
    for prompt, choice in zip(PROMPTS, choices, strict=True):
        plp = choice["prompt_logprobs"]
        assert len(plp) == len(prompt) and plp[0] is None
        if len(prompt) < 2:
            continue
        direct = engine.score_sync(ScoreJob.from_first_rows([prompt], [0], k, want_target_logprobs=True))
        for j, entry in enumerate(plp[1:]):
            actual = prompt[j + 1]
            keys = list(entry)
            assert keys[0] == str(actual)  # the actual token comes first, as in vLLM
            assert entry[str(actual)]["logprob"] == pytest.approx(float(direct.target_logprobs[j]), abs=1e-5)
            assert entry[str(actual)]["rank"] == int(direct.target_ranks[j])
            by_rank = sorted((v["rank"], int(t)) for t, v in entry.items() if v["rank"] <= k)
            assert [t for _, t in by_rank] == direct.token_ids[j].tolist()
            assert len(entry) in (k, k + 1)
            top = direct.token_ids[j].tolist()
            assert (len(entry) == k) == (actual in top)
            assert all(isinstance(v["decoded_token"], str) for v in entry.values())


def test_openai_client_works_unchanged(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    client = openai.OpenAI(base_url=f"{teacher_server.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    resp = client.completions.create(
        model=model, prompt=PROMPTS, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 5}
    )
    choices = [c.model_dump() for c in sorted(resp.choices, key=lambda c: c.index)]
    _check_against_engine(choices, engine, 5)
    assert resp.usage is not None and resp.usage.prompt_tokens == sum(len(p) for p in PROMPTS)


def test_plain_json_and_text_prompts(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    url = f"{teacher_server.url}/v1/completions"
    body = httpx.post(url, json={"prompt": PROMPTS, "max_tokens": 1, "prompt_logprobs": 3}).json()
    assert body["object"] == "text_completion" and body["model"] == "teacher"
    _check_against_engine(body["choices"], engine, 3)
    text = "copy: apple river =>"
    ids = engine.tokenizer(text).input_ids
    by_text = httpx.post(url, json={"prompt": text, "max_tokens": 1, "prompt_logprobs": 2}).json()
    by_ids = httpx.post(url, json={"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}).json()
    assert by_text["choices"][0]["prompt_logprobs"] == by_ids["choices"][0]["prompt_logprobs"]
    no_lp = httpx.post(url, json={"prompt": ids, "max_tokens": 1}).json()
    assert no_lp["choices"][0]["prompt_logprobs"] is None


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": [1, 2, 3], "prompt_logprobs": 100}, "prompt_logprobs"),
        ({"prompt": [1, 2, 3], "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt": [1, 2, 3], "max_tokens": 300, "prompt_logprobs": 2}, "max_tokens"),  # beyond the context
        ({"prompt": [1, 2, 3], "stream": True}, "stream"),
        ({"prompt": [1, 2, 3], "max_tokens": 1, "n": 2}, "n"),  # scoring answers one choice
        ({"prompt": [1, 99999], "prompt_logprobs": 2}, "prompt[0]"),
        ({"prompt": [], "prompt_logprobs": 2}, "prompt"),
        ({"prompt": [1, 2], "model": "gpt-x"}, "model"),
    ],
)
def test_refusals_name_the_field(teacher_server: TeacherProcess, body: dict, param: str) -> None:
    resp = httpx.post(f"{teacher_server.url}/v1/completions", json=body)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["error"]["param"] == param


def test_tokenize_like_vllm(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    text = "sort: 3 1 2 =>"
    body = httpx.post(f"{teacher_server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert body["tokens"] == engine.tokenizer(text, add_special_tokens=False).input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == engine.max_model_len
    refused = httpx.post(f"{teacher_server.url}/tokenize", json={"prompt": 5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"


def test_prompt_logprobs_zero_gives_the_actual_token_only(teacher_server: TeacherProcess, engine: HFEngine) -> None:
    prompt = PROMPTS[0]
    body = httpx.post(f"{teacher_server.url}/v1/completions", json={"prompt": prompt, "prompt_logprobs": 0}).json()
    plp = body["choices"][0]["prompt_logprobs"]
    direct = engine.score_sync(ScoreJob.from_first_rows([prompt], [0], 1, want_target_logprobs=True))
    assert plp[0] is None and len(plp) == len(prompt)
    for j, entry in enumerate(plp[1:]):
        assert list(entry) == [str(prompt[j + 1])]
        assert entry[str(prompt[j + 1])]["rank"] == int(direct.target_ranks[j])
