"""Datasets from where users keep them, encoded once with ``datasets.map`` (cached), checked before training.

``--dataset`` is a local file (jsonl, json, parquet, csv, arrow), a folder written by
``datasets.save_to_disk``, or a hub id for ``datasets.load_dataset`` (:func:`shared.dataset_formats.load_rows`,
shared with ``gkd-teacher precompute``). Every row is encoded into
token ids and row spans (:mod:`shared.dataset_formats`); an invalid row stops the run with the source, the row
number and what is wrong, unless ``--drop_invalid_rows`` drops it, and then it is counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from shared.chat import RowError
from shared.dataset_formats import DataError, DataSource, DataSpec, detect_format, encode_example, load_rows
from student_trainer.data.batch import Example

logger = logging.getLogger(__name__)

ROW_INDEX = "_row"
"""A column numbering the rows before a stream is split over the ranks, so errors name the source's row."""

__all__ = [
    "DataSource",
    "DataStats",
    "ExampleTable",
    "encode_rows",
    "load_examples",
    "split_off_eval",
    "stream_for_rank",
]


def _encode_row(row: dict[str, Any], index: int, fmt: str, tokenizer: Any, spec: DataSpec) -> dict[str, Any]:
    """One row's encoding, or its error: ``datasets.map`` keeps both, so every bad row can be reported."""
    index = row.get(ROW_INDEX, index)
    try:
        ids, spans, truncated = encode_example(row, fmt, tokenizer, spec)
    except RowError as exc:
        return {"input_ids": [], "row_spans": [], "length": 0, "loss_tokens": 0, "truncated": False,
                "error": str(exc), "row": index}  # fmt: skip
    loss_tokens = sum(end - start for start, end in spans)
    return {"input_ids": ids, "row_spans": [list(s) for s in spans], "length": len(ids), "loss_tokens": loss_tokens,
            "truncated": truncated, "error": None, "row": index}  # fmt: skip


def encode_rows(rows: Any, tokenizer: Any, spec: DataSpec, num_proc: int | None = None) -> Any:
    """Rows mapped to token ids, row spans and their counts (lazily when ``rows`` is streamed)."""
    columns = rows.column_names or list(next(iter(rows)).keys())  # a JSON stream knows its columns once read
    fmt = detect_format([c for c in columns if c != ROW_INDEX], spec.format)
    kwargs: dict[str, Any] = {"fn_kwargs": {"fmt": fmt, "tokenizer": tokenizer, "spec": spec}}
    import datasets

    if isinstance(rows, datasets.Dataset):  # map-style: cached, in parallel, with a progress bar
        kwargs.update(num_proc=num_proc, desc=f"encoding {fmt} rows")
    return rows.map(_encode_row, with_indices=True, remove_columns=columns, **kwargs)


def stream_for_rank(source: DataSource, tokenizer: Any, spec: DataSpec, rank: int, world: int) -> Any:
    """This rank's share of a streamed source, encoded as it is read (each rank encodes only its rows)."""
    from datasets.distributed import split_dataset_by_node

    numbered = load_rows(source).map(lambda _, i: {ROW_INDEX: i}, with_indices=True)
    return encode_rows(split_dataset_by_node(numbered, rank=rank, world_size=world), tokenizer, spec)


@dataclass
class DataStats:
    """What the start-up log line reports about a dataset."""

    examples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    drop_reasons: Counter[str] = field(default_factory=Counter)

    def describe(self, name: str) -> str:
        share = self.loss_tokens / max(self.tokens, 1)
        line = (
            f"{name}: {self.examples} examples, {self.tokens} tokens, {self.loss_tokens} loss tokens ({share:.0%}), "
            f"{self.truncated} truncated, {self.dropped} dropped"
        )
        if self.drop_reasons:
            line += " (" + "; ".join(f"{n} x {reason}" for reason, n in self.drop_reasons.most_common(3)) + ")"
        return line


class ExampleTable(Sequence[Example]):
    """The encoded dataset read row by row from Arrow: memory-mapped, never all of it as Python lists."""

    def __init__(self, encoded: Any) -> None:
        self._rows = encoded.select_columns(["input_ids", "row_spans"])
        self.lengths: list[int] = list(encoded["length"])

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> Example: ...

    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...

    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self._rows[i]
        return Example(row["input_ids"], tuple(tuple(s) for s in row["row_spans"]))

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))


def load_examples(
    source: DataSource,
    tokenizer: Any,
    spec: DataSpec,
    drop_invalid: bool = False,
    num_proc: int | None = None,
    rows: Any = None,
) -> tuple[ExampleTable, DataStats]:
    """Every row of ``source`` (or of ``rows``, already loaded from it) encoded and checked before training."""
    encoded = encode_rows(load_rows(source) if rows is None else rows, tokenizer, spec, num_proc)
    errors = [(r, e) for r, e in zip(encoded["row"], encoded["error"], strict=True) if e is not None]
    stats = DataStats()
    if errors:
        first_row, first_error = errors[0]
        if not drop_invalid:
            raise DataError(
                f"{source.name} row {first_row + 1}: {first_error} ({len(errors)} invalid rows in all; "
                "--drop_invalid_rows drops and counts them)"
            )
        stats.dropped = len(errors)
        stats.drop_reasons = Counter(e for _, e in errors)
        encoded = encoded.filter(lambda e: e is None, input_columns="error")
    if len(encoded) == 0:
        raise DataError(f"{source.name} holds no examples to train on")
    stats.examples = len(encoded)
    stats.tokens = sum(encoded["length"])
    stats.loss_tokens = sum(encoded["loss_tokens"])
    stats.truncated = sum(encoded["truncated"])
    return ExampleTable(encoded), stats


def split_off_eval(source: DataSource, fraction: float, seed: int) -> tuple[Any, Any]:
    """(train rows, eval rows) of one source, ``fraction`` of it held out (``--eval_fraction``)."""
    parts = load_rows(source).train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]
