"""Dataset rows in the formats users bring, turned into token ids and the rows of the loss.

Formats (detected from the columns, or forced with ``--dataset_format``):

- ``messages``: OpenAI-style turns; the loss is on every assistant turn (``--assistant_turns last``:
  the last one only), found through the student tokenizer's chat template (:mod:`shared.chat`).
- ``prompt_completion``: TRL's columns, either strings (the completion gets EOS) or lists of
  messages (conversational: only the completion's assistant turns are trained).
- ``text``: whole-sequence distillation, the loss on every token.
- ``tokenized``: ``input_ids`` with ``labels`` (-100 where there is no loss, unshifted as Hugging
  Face models take them) or a ``loss_mask``.

A token at position p that carries loss is predicted by row p-1 (:mod:`shared.alignment`), so a
contiguous run of loss tokens is one row span.

This lives in ``shared`` (tokenizer-only, no trainer imports) because the teacher cache's keys are the
token ids and row spans: ``gkd-teacher precompute`` must encode a dataset exactly as the trainer does,
through these functions and :func:`load_rows`, or its rows would never be hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared.alignment import RowSpan
from shared.chat import RowError, check_messages, render_with_assistant_mask

DatasetFormat = Literal["auto", "messages", "prompt_completion", "text", "tokenized"]
Truncation = Literal["keep_end", "keep_start", "error"]

_COLUMNS: list[tuple[str, frozenset[str]]] = [
    ("messages", frozenset({"messages"})),
    ("prompt_completion", frozenset({"prompt", "completion"})),
    ("tokenized", frozenset({"input_ids"})),
    ("text", frozenset({"text"})),
]


@dataclass(frozen=True)
class DataSpec:
    """How rows become training examples (the ``--dataset_format`` ... ``--truncation`` flags)."""

    format: DatasetFormat = "auto"
    max_length: int = 1024
    max_completion_length: int | None = None
    assistant_turns: Literal["all", "last"] = "all"
    truncation: Truncation = "keep_end"


def detect_format(columns: Sequence[str], forced: DatasetFormat = "auto") -> str:
    """The format of a dataset with these columns; a forced one must find its columns."""
    names = set(columns)
    for fmt, needed in _COLUMNS:
        if forced in ("auto", fmt) and needed <= names:
            return fmt
    wanted = "; ".join(f"{fmt}: {sorted(cols)}" for fmt, cols in _COLUMNS if forced in ("auto", fmt))
    raise ValueError(f"columns {sorted(names)} fit no dataset format (expected {wanted})")


def _prompt_completion(row: dict[str, Any], tokenizer: Any, spec: DataSpec) -> tuple[list[int], list[int]]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        turns = check_messages(prompt, "prompt") + check_messages(completion, "completion")
        if not any(t["role"] == "assistant" for t in completion):
            raise RowError("completion holds no assistant turn")
        return render_with_assistant_mask(tokenizer, turns, prompt_turns=len(prompt))
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise RowError("prompt and completion must both be strings, or both lists of messages")
    p_ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    c_ids = [*tokenizer(completion, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    if spec.max_completion_length is not None:
        c_ids = c_ids[: spec.max_completion_length]
    return p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)


def _tokenized(row: dict[str, Any]) -> tuple[list[int], list[int]]:
    ids, labels, loss_mask = row.get("input_ids"), row.get("labels"), row.get("loss_mask")
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise RowError("input_ids must be a list of token ids")
    if labels is not None:
        if len(labels) != len(ids):
            raise RowError(f"labels has {len(labels)} entries for {len(ids)} input_ids")
        if any(lab not in (-100, tok) for lab, tok in zip(labels, ids, strict=True)):
            raise RowError("labels must equal input_ids where they are not -100 (unshifted, as HF models take them)")
        return ids, [int(lab != -100) for lab in labels]
    if loss_mask is not None:
        if len(loss_mask) != len(ids) or any(m not in (0, 1) for m in loss_mask):
            raise RowError(f"loss_mask must hold {len(ids)} zeros and ones, one per input_id")
        return ids, list(loss_mask)
    raise RowError("a tokenized row needs labels or loss_mask beside input_ids")


def encode(row: dict[str, Any], fmt: str, tokenizer: Any, spec: DataSpec) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one row, before truncation."""
    if fmt == "messages":
        messages = check_messages(row.get("messages"))
        if not any(t["role"] == "assistant" for t in messages):
            raise RowError("messages hold no assistant turn")
        ids, mask = render_with_assistant_mask(tokenizer, messages)
        return ids, _last_run(mask) if spec.assistant_turns == "last" else mask
    if fmt == "prompt_completion":
        return _prompt_completion(row, tokenizer, spec)
    if fmt == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text:
            raise RowError("text must be a non-empty string")
        ids = [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        return ids, [1] * len(ids)
    if fmt == "tokenized":
        return _tokenized(row)
    raise ValueError(f"unknown dataset format {fmt!r}")


def _last_run(mask: list[int]) -> list[int]:
    """Only the last contiguous run of ones (the last assistant turn)."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [int(start <= i < end) for i in range(len(mask))]


def truncate(ids: list[int], mask: list[int], spec: DataSpec) -> tuple[list[int], list[int], bool]:
    """Fit ``max_length``: ``keep_end`` drops the oldest tokens, ``keep_start`` the newest, ``error`` refuses."""
    if len(ids) <= spec.max_length:
        return ids, mask, False
    if spec.truncation == "error":
        raise RowError(f"{len(ids)} tokens do not fit --max_length {spec.max_length} (--truncation error)")
    if spec.truncation == "keep_start":
        return ids[: spec.max_length], mask[: spec.max_length], True
    return ids[-spec.max_length :], mask[-spec.max_length :], True


def spans_from_mask(mask: Sequence[int]) -> list[RowSpan]:
    """Row spans of the loss tokens: token p is row p-1's target; token 0 has no row and cannot carry loss."""
    spans: list[RowSpan] = []
    start = None
    for p in range(1, len(mask) + 1):
        on = p < len(mask) and bool(mask[p])
        if on and start is None:
            start = p - 1
        elif not on and start is not None:
            spans.append((start, p - 1))
            start = None
    return spans


def encode_example(
    row: dict[str, Any], fmt: str, tokenizer: Any, spec: DataSpec
) -> tuple[list[int], list[RowSpan], bool]:
    """(token ids, row spans, truncated) of one row; :class:`RowError` says what is wrong with it."""
    ids, mask = encode(row, fmt, tokenizer, spec)
    if not any(mask):
        raise RowError("the row has no tokens to train on")
    ids, mask, truncated = truncate(ids, mask, spec)
    if fmt == "prompt_completion" and mask and mask[0]:
        raise RowError(f"no room for the prompt inside --max_length {spec.max_length}")
    spans = spans_from_mask(mask)
    if not spans:
        raise RowError(f"no tokens to train on are left inside --max_length {spec.max_length}")
    return ids, spans, truncated


class DataError(ValueError):
    """The data cannot be trained on as given (an invalid row, too few examples, an unreadable source)."""


BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
"""File suffix -> the ``datasets`` builder that reads it."""


@dataclass(frozen=True)
class DataSource:
    """Where rows come from: ``--dataset`` / ``--eval_dataset`` with their split."""

    name: str
    split: str = "train"
    streaming: bool = False


def load_rows(source: DataSource) -> Any:
    """The source's rows as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    ``--dataset`` is a local file (jsonl, json, parquet, csv, arrow), a folder written by
    ``datasets.save_to_disk``, or a hub id for ``datasets.load_dataset``.
    """
    import datasets

    path = Path(source.name)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(f"{source.name} has splits {sorted(loaded)}, not {source.split!r}")
            loaded = loaded[source.split]
        return loaded.to_iterable_dataset() if source.streaming else loaded
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{source.name}: unknown file type; expected one of {sorted(BUILDERS)}")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=source.streaming)
    return datasets.load_dataset(source.name, split=source.split, streaming=source.streaming)
