"""The tiny assets' chat template, special tokens and data files.

The trainer takes its loss masks from ``apply_chat_template(..., return_assistant_tokens_mask=True)``,
so these tests pin that mask against masks built by hand: 1 on every assistant turn's content and
its closing ``<|im_end|>`` (what the model must emit), 0 on everything else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from demo.tiny import CHAT_TEMPLATE, DEFAULT_SYSTEM, EOS, IM_END, IM_START, SEED, TinyAssets, make_conversations

# sha256 of the prompt/completion files, unchanged since tiny-v1: tests and the demo rely on their rows.
PLAIN_SHA256 = {
    "train.jsonl": "20b356715ee00430a2ad1777d3f6d606cf8adffd534b0a8b47bd90a0b9e7a231",
    "eval.jsonl": "eceeaf2bd723514764710c4cc417230a28e0b1318ceb5377245265313bb9eb73",
}
Segment = tuple[str, int]  # (text, mask value)


@pytest.fixture(scope="module")
def tokenizer(tiny_assets: TinyAssets) -> Any:
    return AutoTokenizer.from_pretrained(tiny_assets.tokenizer)


def turn(role: str, content: str) -> list[Segment]:
    return [(f"{IM_START}{role}\n{content}{IM_END}\n", 0)]


def assistant(content: str) -> list[Segment]:
    return [(f"{IM_START}assistant\n", 0), (f"{content}{IM_END}", 1), ("\n", 0)]


def by_hand(tokenizer: Any, segments: list[Segment]) -> tuple[list[int], list[int]]:
    """Ids and mask of the segments tokenized one by one: the whole render's only if no token spans two."""
    ids: list[int] = []
    mask: list[int] = []
    for text, value in segments:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        mask += [value] * len(piece)
    return ids, mask


def check(tokenizer: Any, messages: list[dict[str, Any]], segments: list[Segment], **kwargs: Any) -> None:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, **kwargs) == "".join(t for t, _ in segments)
    ids, mask = by_hand(tokenizer, segments)
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == mask


def test_chat_delimiters_are_single_special_tokens_and_eos_stays(tokenizer: Any) -> None:
    for token in (IM_START, IM_END):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer(f"a{token}b", add_special_tokens=False).input_ids[1] == token_id
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
        assert token in tokenizer.all_special_tokens
    assert tokenizer.eos_token == EOS, "prompt/completion rows end with </s>; chat turns end with <|im_end|>"


def test_template_survives_save_and_reload(tiny_assets: TinyAssets) -> None:
    for path in (tiny_assets.tokenizer, tiny_assets.teacher, tiny_assets.student):
        assert AutoTokenizer.from_pretrained(path).chat_template == CHAT_TEMPLATE, path


def test_single_turn_gets_the_default_system_prompt(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "copy: apple river"}, {"role": "assistant", "content": "apple river"}]
    check(
        tokenizer,
        messages,
        turn("system", DEFAULT_SYSTEM) + turn("user", "copy: apple river") + assistant("apple river"),
    )


def test_multi_turn_masks_every_assistant_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "sort: 8 6 9"},
        {"role": "assistant", "content": "6 8 9"},
        {"role": "user", "content": "reverse that"},
        {"role": "assistant", "content": "9 8 6"},
        {"role": "user", "content": "after tuesday"},
        {"role": "assistant", "content": "wednesday"},
    ]
    segments = turn("system", DEFAULT_SYSTEM)
    for user, answer in (("sort: 8 6 9", "6 8 9"), ("reverse that", "9 8 6"), ("after tuesday", "wednesday")):
        segments += turn("user", user) + assistant(answer)
    check(tokenizer, messages, segments)


def test_system_prompt_replaces_the_default(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Reply briefly."},
        {"role": "user", "content": "add: 3 + 4"},
        {"role": "assistant", "content": "7"},
    ]
    check(tokenizer, messages, turn("system", "Reply briefly.") + turn("user", "add: 3 + 4") + assistant("7"))


def test_tool_call_is_a_json_line_in_the_assistant_turn_and_the_tool_turn_is_not_learned(tokenizer: Any) -> None:
    call = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
    messages = [
        {"role": "user", "content": "use the add tool: 3 + 4"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": "7"},
        {"role": "assistant", "content": "3 + 4 = 7"},
    ]
    line = '{"name": "add", "arguments": {"a": 3, "b": 4}}'
    segments = turn("system", DEFAULT_SYSTEM) + turn("user", "use the add tool: 3 + 4")
    segments += assistant(line) + turn("tool", "7") + assistant("3 + 4 = 7")
    check(tokenizer, messages, segments)
    # arguments as an object (the transformers convention) render the same line
    messages[1]["tool_calls"] = [{"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}]
    check(tokenizer, messages, segments)


def test_generation_prompt_opens_an_unmasked_assistant_turn(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "after monday"}]
    segments = [*turn("system", DEFAULT_SYSTEM), *turn("user", "after monday"), (f"{IM_START}assistant\n", 0)]
    check(tokenizer, messages, segments, add_generation_prompt=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chat_files_are_short_multi_turn_conversations(tiny_assets: TinyAssets, tokenizer: Any) -> None:
    train, held_out = read_jsonl(tiny_assets.chat_train_file), read_jsonl(tiny_assets.chat_eval_file)
    assert len(train) >= 2000 and len(held_out) == 256
    assert held_out == make_conversations(256, SEED + 3), "the held-out chats are regenerated from the seed"
    rows = train + held_out
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert set(roles) <= {"system", "user", "assistant", "tool"} and roles[-1] == "assistant"
        assert "system" not in roles[1:]
    assistant_turns = [sum(m["role"] == "assistant" for m in row["messages"]) for row in rows]
    assert sum(n >= 3 for n in assistant_turns) > len(rows) // 4
    assert 0.2 < sum(row["messages"][0]["role"] == "system" for row in rows) / len(rows) < 0.5
    assert any(m["role"] == "tool" for row in rows for m in row["messages"])
    ids = tokenizer.apply_chat_template([row["messages"] for row in rows], tokenize=True, return_dict=True)["input_ids"]
    assert max(map(len, ids)) <= 256, "every conversation fits the tiny models' 256 positions"


def test_prompt_completion_files_are_unchanged(tiny_assets: TinyAssets) -> None:
    for path in (tiny_assets.train_file, tiny_assets.eval_file):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == PLAIN_SHA256[path.name], path
