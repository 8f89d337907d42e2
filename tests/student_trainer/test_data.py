"""Training data: every format's token ids and loss-row spans, chat masks against spans found by hand,
sources (jsonl, parquet, save_to_disk), invalid rows, length grouping and exact streaming resume."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from demo.tiny import TinyAssets
from shared.chat import RowError, has_generation_blocks, render_with_assistant_mask
from shared.dataset_formats import detect_format, encode_example, spans_from_mask
from student_trainer.data import DataError, DataSource, DataSpec, Example, ShardedBatches, StreamingBatches
from student_trainer.data.sources import load_examples, stream_for_rank

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single-turn": [{"role": "user", "content": "add: 2 + 3 =>"}, {"role": "assistant", "content": "5"}],
    "multi-turn": [
        {"role": "user", "content": "copy: apple river =>"},
        {"role": "assistant", "content": "apple river"},
        {"role": "user", "content": "after monday =>"},
        {"role": "assistant", "content": "tuesday"},
        {"role": "user", "content": "sort: 3 1 2 =>"},
        {"role": "assistant", "content": "1 2 3"},
    ],
    "system prompt": [
        SYSTEM,
        {"role": "user", "content": "reverse: stone cloud =>"},
        {"role": "assistant", "content": "cloud stone"},
    ],
    "tool call": [
        {"role": "user", "content": "add: 20 + 22 =>"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 20, "b": 22}}}],
        },
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "42"},
    ],
}


@pytest.fixture(scope="module")
def tok(tiny_assets: TinyAssets) -> Any:
    return AutoTokenizer.from_pretrained(tiny_assets.student)


def assistant_runs_by_hand(tok: Any, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) token ranges of the assistant turns, read off the ChatML markers: after each
    `<|im_start|>assistant\\n` header, up to and including the `<|im_end|>` that closes the turn."""
    start_id, end_id = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tok("assistant\n", add_special_tokens=False).input_ids
    runs, p = [], 0
    while p < len(ids):
        if ids[p] == start_id and ids[p + 1 : p + 1 + len(header)] == header:
            begin = p + 1 + len(header)
            end = ids.index(end_id, begin) + 1
            runs.append((begin, end))
            p = end
        else:
            p += 1
    return runs


def mask_runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for p, m in enumerate([*mask, 0]):
        if m and start is None:
            start = p
        elif not m and start is not None:
            runs.append((start, p))
            start = None
    return runs


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_masks_equal_the_assistant_turns_found_by_hand(tok: Any, name: str) -> None:
    assert has_generation_blocks(tok), "the tiny tokenizer's template marks its assistant blocks"
    messages = CONVERSATIONS[name]
    ids, mask = render_with_assistant_mask(tok, messages)
    by_hand = assistant_runs_by_hand(tok, ids)
    assert len(by_hand) == sum(t["role"] == "assistant" for t in messages)
    got = mask_runs(mask)
    # the template may keep the newline after <|im_end|> inside the generation block
    assert [s for s, _ in got] == [s for s, _ in by_hand]
    assert all(e in (he, he + 1) for (_, e), (_, he) in zip(got, by_hand, strict=True))
    example_ids, spans, _ = encode_example({"messages": messages}, "messages", tok, DataSpec())
    assert example_ids == ids and spans == [(s - 1, e - 1) for s, e in got]


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_templates_without_generation_blocks_find_the_same_turns(tok: Any, name: str) -> None:
    """Turn-by-turn rendering finds each turn the generation blocks mark (it also takes the separator the
    template writes after a turn, here the newline after <|im_end|>)."""
    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", plain.chat_template)
    assert not has_generation_blocks(plain)
    ids, mask = render_with_assistant_mask(plain, CONVERSATIONS[name])
    ref_ids, ref_mask = render_with_assistant_mask(tok, CONVERSATIONS[name])
    assert ids == ref_ids
    got, ref = mask_runs(mask), mask_runs(ref_mask)
    assert [s for s, _ in got] == [s for s, _ in ref]
    assert all(e in (re_, re_ + 1) for (_, e), (_, re_) in zip(got, ref, strict=True))


def test_last_assistant_turn_only(tok: Any) -> None:
    row = {"messages": CONVERSATIONS["multi-turn"]}
    _, every, _ = encode_example(row, "messages", tok, DataSpec())
    _, last, _ = encode_example(row, "messages", tok, DataSpec(assistant_turns="last"))
    assert len(every) == 3 and last == every[-1:]


def test_conversational_prompt_completion_trains_the_completion_only(tok: Any) -> None:
    turns = CONVERSATIONS["multi-turn"]
    row = {"prompt": turns[:3], "completion": turns[3:4]}
    ids, spans, _ = encode_example(row, "prompt_completion", tok, DataSpec())
    full_ids, full_spans, _ = encode_example({"messages": turns[:4]}, "messages", tok, DataSpec())
    assert ids == full_ids and spans == full_spans[-1:]


def test_plain_text_and_tokenized_rows(tok: Any) -> None:
    ids, spans, _ = encode_example({"text": "copy: apple => apple"}, "text", tok, DataSpec())
    assert ids[-1] == tok.eos_token_id and spans == [(0, len(ids) - 1)]
    row = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, -100]}
    assert encode_example(row, "tokenized", tok, DataSpec())[1] == [(1, 3)]
    row = {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 1, 0, 1, 1]}
    assert encode_example(row, "tokenized", tok, DataSpec())[1] == [(0, 1), (2, 4)]
    with pytest.raises(RowError, match="unshifted"):
        encode_example({"input_ids": [5, 6, 7], "labels": [6, 7, -100]}, "tokenized", tok, DataSpec())


def test_spans_from_mask_skip_token_zero() -> None:
    assert spans_from_mask([1, 1, 0, 1]) == [(0, 1), (2, 3)]
    assert spans_from_mask([0, 0, 0]) == []


@pytest.mark.parametrize(
    "row,message",
    [
        ({"messages": [{"content": "hi"}]}, r"messages\[0\] has no role"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "no content"),
        ({"messages": [{"role": "narrator", "content": "hi"}]}, "role 'narrator'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ],
)
def test_malformed_conversations_are_refused_with_what_is_wrong(tok: Any, row: dict, message: str) -> None:
    with pytest.raises(RowError, match=message):
        encode_example(row, "messages", tok, DataSpec())


def test_truncation_modes(tok: Any) -> None:
    row = {"messages": CONVERSATIONS["multi-turn"]}
    full, spans, _ = encode_example(row, "messages", tok, DataSpec())
    limit = spans[1][1]  # ends inside the conversation, after the second turn's rows
    kept, kept_spans, cut = encode_example(row, "messages", tok, DataSpec(max_length=limit, truncation="keep_start"))
    assert cut and kept == full[:limit] and kept_spans[0] == spans[0]
    tail, _, cut = encode_example(row, "messages", tok, DataSpec(max_length=limit, truncation="keep_end"))
    assert cut and tail == full[-limit:]
    with pytest.raises(RowError, match="do not fit --max_length"):
        encode_example(row, "messages", tok, DataSpec(max_length=limit, truncation="error"))


def test_format_detection() -> None:
    assert detect_format(["messages", "id"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["input_ids", "labels"]) == "tokenized"
    assert detect_format(["text"]) == "text"
    with pytest.raises(ValueError, match="fit no dataset format"):
        detect_format(["question", "answer"])
    with pytest.raises(ValueError, match="fit no dataset format"):
        detect_format(["prompt", "completion"], "messages")


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int) -> list[dict[str, Any]]:
    names = list(CONVERSATIONS)
    return [{"messages": CONVERSATIONS[names[i % len(names)]]} for i in range(n)]


def test_jsonl_parquet_and_save_to_disk_give_the_same_examples(tok: Any, tmp_path: Path) -> None:
    import datasets

    jsonl = write_rows(tmp_path / "chat.jsonl", chat_rows(12))
    table = datasets.load_dataset("json", data_files=str(jsonl), split="train")
    table.to_parquet(str(tmp_path / "chat.parquet"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    got = [
        list(load_examples(DataSource(str(p)), tok, DataSpec())[0])
        for p in (jsonl, tmp_path / "chat.parquet", tmp_path / "saved")
    ]
    assert got[0] == got[1] == got[2] and len(got[0]) == 12
    with pytest.raises(DataError, match="splits \\['train'\\], not 'test'"):
        load_examples(DataSource(str(tmp_path / "saved"), split="test"), tok, DataSpec())


def test_invalid_rows_stop_before_training_or_are_dropped_and_counted(tok: Any, tmp_path: Path) -> None:
    rows = chat_rows(6)
    rows[3] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    path = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl row 4: messages\[1\] is an assistant turn with no content"):
        load_examples(DataSource(str(path)), tok, DataSpec())
    examples, stats = load_examples(DataSource(str(path)), tok, DataSpec(), drop_invalid=True)
    assert len(examples) == 5 and stats.dropped == 1 and "1 dropped" in stats.describe("bad.jsonl")
    assert stats.loss_tokens == sum(e - s for ex in examples for s, e in ex.row_spans)


def test_group_by_length_pads_less_and_covers_every_example() -> None:
    examples = [Example.completion(list(range(3 + (i * 7) % 40)), 2) for i in range(64)]
    lengths = [len(e.input_ids) for e in examples]

    def epoch(grouped: bool) -> tuple[int, list[list[int]]]:
        it = iter(ShardedBatches(examples, 4, 0, 1, 0, 0, lengths if grouped else None))
        batches = [next(it) for _ in range(16)]
        return sum(int((b.attention_mask == 0).sum()) for b in batches), sorted(s for b in batches for s in b.sequences)

    (grouped_pad, grouped_seqs), (random_pad, random_seqs) = epoch(True), epoch(False)
    assert grouped_seqs == random_seqs and grouped_pad < random_pad / 2


def test_streaming_resumes_after_the_last_batch_consumed(tok: Any, tmp_path: Path) -> None:
    path = write_rows(tmp_path / "stream.jsonl", chat_rows(14))
    source = DataSource(str(path), streaming=True)

    def batches(rank: int) -> StreamingBatches:
        return StreamingBatches(stream_for_rank(source, tok, DataSpec(), rank, 2), 2, 0, str(path))

    run = iter(batches(1))
    first = [next(run) for _ in range(5)]  # crosses the end of an epoch (7 rows per rank: 3 batches)
    state = first[1].data_state
    resumed = batches(1)
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert [next(again).sequences for _ in range(3)] == [b.sequences for b in first[2:]]
    other = next(iter(batches(0)))
    assert other.sequences != first[0].sequences  # the ranks read different rows
