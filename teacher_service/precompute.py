"""``gkd-teacher precompute``: fill a teacher cache offline from a dataset, with the service's engines.

Rows are encoded exactly as the trainer encodes them (:mod:`shared.dataset_formats`, the same data
flags), so the keys written here are the keys a run with ``--teacher_cache`` looks up. Progress is the
cache itself: a sequence whose key is already there is skipped, so a precompute that was stopped resumes
where its last sealed shard ends (shards are sealed every ``--seal-seconds``) and several precomputes
may share one directory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import Field
from tqdm import tqdm

from shared.alignment import RowSpan
from shared.chat import RowError
from shared.dataset_formats import (
    DatasetFormat,
    DataSource,
    DataSpec,
    Truncation,
    detect_format,
    encode_example,
    load_rows,
)
from shared.teacher_cache import CacheContext, TeacherCache
from teacher_service.config import ServiceConfig
from teacher_service.engines.base import ScoreJob, TeacherEngine
from teacher_service.flags import add_model_flags, configure_logging, parse_model
from teacher_service.revision import served_revision

logger = logging.getLogger(__name__)

REQUEST_TEMPERATURE = 1.0
"""Rows at the temperature the trainer asks for (raw log-probs): the cache key says so."""


class PrecomputeConfig(ServiceConfig):
    """The engine flags of the service, the trainer's data flags (same meaning and defaults), and the cache."""

    dataset: str = Field(
        description="The training data, as the trainer's --dataset (file, save_to_disk folder, hub id)."
    )
    out: str = Field(description="Teacher cache directory to fill (the trainer's --teacher_cache).")
    dataset_split: str = Field(default="train", description="Split of a hub dataset or DatasetDict (--dataset_split).")
    dataset_format: DatasetFormat = Field(default="auto", description="As the trainer's --dataset_format.")
    max_length: int = Field(default=1024, ge=2, description="As the trainer's --max_length.")
    max_completion_length: int | None = Field(default=None, ge=1, description="As --max_completion_length.")
    assistant_turns: Literal["all", "last"] = Field(default="all", description="As the trainer's --assistant_turns.")
    truncation: Truncation = Field(default="keep_end", description="As the trainer's --truncation.")
    top_k: int = Field(default=20, ge=1, description="As the trainer's --top_k (part of every key).")
    tail: bool = Field(
        default=True,
        description="Store tail_logmass (the trainer's --tail tail, its default); --no-tail for --tail renorm.",
    )
    batch_sequences: int = Field(default=64, ge=1, description="Sequences per engine call.")
    seal_seconds: float = Field(
        default=60.0, gt=0, description="Seal the shard this often: what a stopped precompute keeps."
    )

    def data_spec(self) -> DataSpec:
        return DataSpec(
            format=self.dataset_format,
            max_length=self.max_length,
            max_completion_length=self.max_completion_length,
            assistant_turns=self.assistant_turns,
            truncation=self.truncation,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gkd-teacher precompute",
        description="Fill a teacher cache (the trainer's --teacher_cache) from a dataset, offline.",
    )
    add_model_flags(parser, PrecomputeConfig)
    return parser


def parse_config(argv: Sequence[str] | None) -> PrecomputeConfig:
    return parse_model(build_parser(), argv, PrecomputeConfig)


def encoded_rows(rows: Any, tokenizer: Any, spec: DataSpec) -> Iterator[tuple[list[int], list[RowSpan]] | None]:
    """Each row's (token ids, row spans), as the trainer encodes it, or None for an invalid row (the trainer
    refuses or drops it, so no key of its is ever asked for)."""
    fmt = detect_format(list(rows.column_names), spec.format)
    for row in rows:
        try:
            ids, spans, _ = encode_example(row, fmt, tokenizer, spec)
        except RowError:
            yield None
            continue
        yield ids, list(spans)


async def precompute(config: PrecomputeConfig, engine: TeacherEngine) -> dict[str, int]:
    """Score every row of the dataset whose key the cache lacks; returns the counts."""
    await engine.start()
    context = CacheContext(
        model=engine.served_model_name,
        model_revision=served_revision(engine.model_dir, config.model_revision) or "",
        tokenizer_fingerprint=engine.tokenizer_fingerprint,
        vocab_size=engine.vocab_size,
        top_k=config.top_k,
        temperature=REQUEST_TEMPERATURE,
        tail=config.tail,
    )
    if engine.tokenizer is None:
        raise ValueError(f"engine {engine.engine_name} has no tokenizer to encode the dataset with")
    rows = load_rows(DataSource(config.dataset, config.dataset_split))
    counts = {"rows": len(rows), "scored": 0, "cached": 0, "invalid": 0, "duplicate": 0}
    started = time.perf_counter()
    with TeacherCache(config.out, context, seal_seconds=config.seal_seconds) as cache:
        bar = tqdm(total=len(rows), desc="precompute", unit="row", mininterval=1.0)
        batch: dict[bytes, tuple[list[int], list[RowSpan]]] = {}

        async def flush() -> None:
            nonlocal batch
            found = cache.locate(batch)
            todo = {key: seq for key, seq in batch.items() if key not in found}
            counts["cached"] += len(batch) - len(todo)
            if todo:
                job = ScoreJob(
                    sequences=[ids for ids, _ in todo.values()],
                    row_spans=[spans for _, spans in todo.values()],
                    top_k=config.top_k,
                    want_tail_logmass=config.tail,
                )
                frame = (await engine.score(job)).with_spans()
                for j, key in enumerate(todo):
                    cache.put(key, frame.select(j, j + 1))
                counts["scored"] += len(todo)
            batch = {}

        for encoded in encoded_rows(rows, engine.tokenizer, config.data_spec()):
            bar.update(1)
            if encoded is None:
                counts["invalid"] += 1
                continue
            key = context.key(*encoded)
            counts["duplicate"] += key in batch
            batch[key] = encoded
            if len(batch) >= config.batch_sequences:
                await flush()
            bar.set_postfix(scored=counts["scored"], cached=counts["cached"], invalid=counts["invalid"])
        if batch:
            await flush()
        bar.close()
    await engine.close()
    elapsed = time.perf_counter() - started
    logger.info(
        "precompute: %d rows, %d scored (%.1f rows/s), %d already cached, %d invalid, %d duplicates, into %s",
        counts["rows"], counts["scored"], counts["scored"] / max(elapsed, 1e-9), counts["cached"],
        counts["invalid"], counts["duplicate"], config.out,
    )  # fmt: skip
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    from teacher_service.app import build_engine

    config = parse_config(argv)
    try:
        import datasets  # noqa: F401  (read by shared.dataset_formats.load_rows)
    except ImportError as exc:
        raise SystemExit(
            "gkd-teacher precompute reads datasets with the `datasets` package: pip install 'gkd-topk[precompute]'"
        ) from exc
    configure_logging(config.log_level, config.log_format)
    return asyncio.run(precompute(config, build_engine(config)))
