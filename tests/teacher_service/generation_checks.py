"""Generation through ``/v1/completions`` checked with the official ``openai`` client, whatever the engine:
run against the transformers engine by test_generation.py and against the vLLM engine by test_vllm_engine.py.

References are transformers ``generate`` on the same weights, one prompt at a time without padding.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import torch

TASK_PROMPT = "copy: apple river =>"
"""The tiny teacher answers this one with a short completion and EOS."""
RANDOM_PROMPT = [57, 301, 122, 498, 33, 260, 417]
"""Token ids the teacher has no pattern for: a broad next-token distribution, so samples differ by seed."""


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int, eos: list[int] | None = None) -> list[int]:
    """Greedy tokens of one unpadded prompt, stopped at (and including) the first EOS; ``eos=[]`` never stops."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=eos,
            pad_token_id=0,
        )
    tokens = out[0, len(prompt) :].tolist()
    stops = set(eos if eos is not None else model.generation_config.eos_token_id)
    cut = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:cut]


def client(base_url: str) -> tuple[openai.OpenAI, str]:
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    return c, c.models.list().data[0].id


def choices_of(resp: Any) -> list[dict[str, Any]]:
    return [c.model_dump() for c in sorted(resp.choices, key=lambda c: c.index)]


def check_openai_generation(base_url: str, model: torch.nn.Module, tokenizer: Any, context: int) -> None:
    """Token-id and text prompts, n, seed reproducibility, stop strings and ids, token ids, usage, refusals."""
    c, name = client(base_url)
    task = tokenizer(TASK_PROMPT).input_ids
    ids = {"return_token_ids": True}

    # greedy: the transformers reference, token ids and text, both prompt forms
    ref = hf_greedy(model, task, 12)
    assert ref[-1] in model.generation_config.eos_token_id, "the task prompt should end in EOS within 12 tokens"
    for prompt in (task, TASK_PROMPT):
        resp = c.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0, extra_body=ids)
        (choice,) = choices_of(resp)
        assert choice["token_ids"] == ref and choice["prompt_token_ids"] == task
        assert choice["text"] == tokenizer.decode(ref[:-1], skip_special_tokens=True)
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None  # the tokenizer's EOS
        assert resp.usage is not None
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(task), len(ref))
        assert resp.usage.total_tokens == len(task) + len(ref)

    # several token-id prompts x n samples, seeded: choices prompt-major, reproducible, seed-dependent
    prompts = [RANDOM_PROMPT, task, RANDOM_PROMPT[:3]]
    sample = {"model": name, "prompt": prompts, "max_tokens": 6, "n": 3, "temperature": 1.0, "extra_body": ids}
    first = c.completions.create(seed=1234, **sample)
    again = c.completions.create(seed=1234, **sample)
    other = c.completions.create(seed=4321, **sample)
    got = choices_of(first)
    assert [ch["index"] for ch in got] == list(range(9))
    assert [ch["prompt_token_ids"] for ch in got] == [p for p in prompts for _ in range(3)]
    for ch in got:
        assert 1 <= len(ch["token_ids"]) <= 6 and all(0 <= t < len(tokenizer) for t in ch["token_ids"])
        ended = ch["token_ids"][-1] in model.generation_config.eos_token_id
        assert ch["finish_reason"] == ("stop" if ended else "length")
        assert ended or len(ch["token_ids"]) == 6
    assert [ch["token_ids"] for ch in choices_of(again)] == [ch["token_ids"] for ch in got]
    assert [ch["token_ids"] for ch in choices_of(other)] != [ch["token_ids"] for ch in got]
    assert len({tuple(ch["token_ids"]) for ch in got[:3]}) > 1, "n samples of one prompt should differ"
    assert first.usage is not None and first.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert first.usage.completion_tokens == sum(len(ch["token_ids"]) for ch in got)

    # stop token ids and stop strings, on a completion that would not stop by itself (EOS ignored)
    long = hf_greedy(model, RANDOM_PROMPT, 10, eos=[])
    base = {"model": name, "prompt": RANDOM_PROMPT, "max_tokens": 10, "temperature": 0}
    no_eos = {**ids, "ignore_eos": True}
    (full,) = choices_of(c.completions.create(**base, extra_body=no_eos))
    assert full["token_ids"] == long and full["finish_reason"] == "length"
    stop_id = long[3]
    (by_id,) = choices_of(c.completions.create(**base, extra_body={**no_eos, "stop_token_ids": [stop_id]}))
    cut = long.index(stop_id) + 1
    assert by_id["token_ids"] == long[:cut] and by_id["finish_reason"] == "stop" and by_id["stop_reason"] == stop_id
    assert by_id["text"] == tokenizer.decode(long[: cut - 1], skip_special_tokens=True)
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    (by_str,) = choices_of(c.completions.create(**base, stop=[stop], extra_body=no_eos))
    assert by_str["finish_reason"] == "stop" and by_str["stop_reason"] == stop
    assert by_str["text"] == text[: text.index(stop)]
    assert by_str["token_ids"] == long[: len(by_str["token_ids"])] and len(by_str["token_ids"]) < len(long)
    kept = {**no_eos, "include_stop_str_in_output": True}
    (with_str,) = choices_of(c.completions.create(**base, stop=stop, extra_body=kept))
    assert with_str["text"] == text[: text.index(stop) + len(stop)]

    # without return_token_ids the ids are left out, as vLLM leaves them out
    (plain,) = choices_of(c.completions.create(model=name, prompt=task, max_tokens=12, temperature=0))
    assert plain["token_ids"] is None and plain["prompt_token_ids"] is None
    assert plain["text"] == tokenizer.decode(ref[:-1], skip_special_tokens=True)

    # refusals are 400s naming the field
    url = f"{base_url}/v1/completions"
    max_sequences = httpx.get(f"{base_url}/v1/info").json()["limits"]["max_sequences"]
    for body, param in [
        ({"prompt": task, "max_tokens": context}, "max_tokens"),
        ({"prompt": task, "max_tokens": 4, "n": 2, "temperature": 0}, "n"),
        ({"prompt": [task] * (max_sequences // 2 + 1), "max_tokens": 4, "n": 2}, "n"),
        ({"prompt": task, "max_tokens": 4, "temperature": 2.5}, "temperature"),
        ({"prompt": task, "max_tokens": 4, "top_p": 0}, "top_p"),
        ({"prompt": task, "max_tokens": 4, "stop": [""]}, "stop"),
        ({"prompt": task, "max_tokens": 4, "stop_token_ids": [len(tokenizer) + 5]}, "stop_token_ids"),
        ({"prompt": task, "max_tokens": 4, "logprobs": 2}, "logprobs"),
        ({"prompt": task, "max_tokens": 4, "echo": True}, "echo"),
    ]:
        resp = httpx.post(url, json=body, timeout=60)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["param"] == param, (body, resp.text)
