"""Training data: datasets in the formats users bring, encoded into token ids and loss-row spans, batched per rank.

``sources`` loads and encodes (``datasets``); :mod:`shared.dataset_formats` turns one row into ids and a
loss mask and :mod:`shared.chat` applies the student's chat template (shared with ``gkd-teacher precompute``,
whose cache keys must be the trainer's); ``batch`` holds examples and micro-batches,
``sampling`` yields a rank's micro-batches with what a checkpoint needs to resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.chat import RowError
from shared.dataset_formats import DatasetFormat, DataSpec, Truncation
from student_trainer.data.batch import Batch, Example, collate
from student_trainer.data.sampling import DataError, ShardedBatches, StreamingBatches
from student_trainer.data.sources import DataSource, DataStats, ExampleTable, load_examples

__all__ = [
    "Batch",
    "DataError",
    "DataSource",
    "DataSpec",
    "DataStats",
    "DatasetFormat",
    "Example",
    "ExampleTable",
    "RowError",
    "ShardedBatches",
    "StreamingBatches",
    "Truncation",
    "collate",
    "load_examples",
    "load_jsonl",
]


def load_jsonl(
    path: str | Path, tokenizer: Any, max_length: int, max_completion_length: int | None = None
) -> ExampleTable:
    """The examples of a JSONL file in any format, with the trainer's defaults (evaluation, demo, benchmarks)."""
    spec = DataSpec(max_length=max_length, max_completion_length=max_completion_length)
    return load_examples(DataSource(str(path)), tokenizer, spec)[0]
