"""``--teacher_cache DIR``: a teacher that answers from the on-disk cache and asks its inner teacher only for misses.

It wraps any top-k :class:`~.rows.Teacher` (it sees only ``request(batch)`` and the rows it returns):
each sequence of a micro-batch is looked up by its key (:mod:`shared.teacher_cache`); the misses go to the
inner teacher as one smaller micro-batch, and their rows are written back when they arrive, so a second
epoch asks the teacher nothing. Hits are read and decoded on a background thread while the step before
trains. With ``--teacher_cache_offline`` there is no inner teacher: the context comes from the cache
itself and a miss stops training.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.codec import FrameError, TopkFrame
from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import TeacherInfo
from shared.teacher_cache import CacheContext, CacheError, Location, TeacherCache, cached_contexts
from student_trainer.data import Batch
from student_trainer.teacher.errors import TeacherError, TeacherProtocolError
from student_trainer.teacher.gkd import TeacherClient
from student_trainer.teacher.rows import Deferred, Handle, Teacher, TeacherRows, TopkRows

if TYPE_CHECKING:
    from student_trainer.config import TrainerConfig

logger = logging.getLogger(__name__)

REQUEST_TEMPERATURE = 1.0
"""The temperature of the rows the trainer asks a teacher for (raw log-probs; the loss applies its own)."""


class TeacherCacheMissError(TeacherError):
    """An offline run (``--teacher_cache_offline``) needs rows the cache does not hold, or cannot use the cache."""


def _select(batch: Batch, idx: list[int]) -> Batch:
    """The sequences ``idx`` of a micro-batch as a micro-batch of their own (same padding width)."""
    return Batch(
        batch.input_ids[idx],
        batch.attention_mask[idx],
        [batch.row_spans[i] for i in idx],
        [batch.sequences[i] for i in idx],
        dict(batch.data_state),
        teachers=[batch.teachers[i] for i in idx] if batch.teachers else [],
    )


class CachedTeacher:
    """Hits from ``cache``, misses from ``inner`` (written back); ``inner=None``: the cache alone."""

    can_generate = False

    def __init__(self, inner: Teacher | None, cache: TeacherCache) -> None:
        self.inner, self.cache = inner, cache
        self.hits = self.misses = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-cache")

    def request(self, batch: Batch, on_policy: bool = False) -> Handle[TeacherRows]:
        if on_policy:  # the student's samples: never seen again, not worth a cache entry
            if self.inner is None:
                raise TeacherCacheMissError("on-policy samples need a teacher: not with --teacher_cache_offline")
            return self.inner.request(batch, on_policy=True)
        context = self.cache.context
        keys = [context.key(seq, spans) for seq, spans in zip(batch.sequences, batch.row_spans, strict=True)]
        found = self.cache.locate(keys)
        missing = [i for i, key in enumerate(keys) if key not in found]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing and self.inner is None:
            raise TeacherCacheMissError(
                f"--teacher_cache_offline: {len(missing)} of {len(keys)} sequences of a micro-batch are not in "
                f"{self.cache.root} (first: {len(batch.sequences[missing[0]])} tokens); fill it with "
                "`gkd-teacher precompute` using this run's data flags, or train with the teacher"
            )
        pending = self.inner.request(_select(batch, missing)) if missing and self.inner is not None else None
        hits = [(i, keys[i], found[keys[i]]) for i in range(len(keys)) if keys[i] in found]
        reading = self._pool.submit(self._read, hits)
        return Deferred(lambda: TopkRows(self._assemble(batch, keys, missing, pending, reading)))

    def _read(self, hits: list[tuple[int, bytes, Location]]) -> dict[int, TopkFrame | None]:
        return {i: self.cache.read(key, where) for i, key, where in hits}

    def _assemble(
        self,
        batch: Batch,
        keys: list[bytes],
        missing: list[int],
        pending: Handle[TeacherRows] | None,
        reading: concurrent.futures.Future[dict[int, TopkFrame | None]],
    ) -> TopkFrame:
        parts: dict[int, TopkFrame | None] = dict(reading.result())
        if pending is not None:
            parts.update(self._write_back(keys, missing, pending.result()))
        bad = [i for i, part in parts.items() if part is None]
        if bad:  # records that failed their checks when read (warned about): fetch them again
            if self.inner is None:
                raise TeacherCacheMissError(f"--teacher_cache_offline: {len(bad)} cached records failed their checks")
            parts.update(self._write_back(keys, bad, self.inner.request(_select(batch, bad)).result()))
        frame = TopkFrame.concat([p for _, p in sorted(parts.items()) if p is not None])
        try:
            frame.validate()  # records are read unvalidated: the micro-batch is checked once, as a decoded frame is
        except FrameError as exc:
            raise TeacherProtocolError(f"teacher cache {self.cache.root}: rows do not fit together: {exc}") from exc
        if frame.spans() != [list(spans) for spans in batch.row_spans]:
            raise TeacherProtocolError(f"teacher cache {self.cache.root}: rows of other spans than the micro-batch's")
        return frame

    def _write_back(self, keys: list[bytes], idx: list[int], rows: TeacherRows) -> dict[int, TopkFrame | None]:
        if not isinstance(rows, TopkRows):
            raise TeacherProtocolError("--teacher_cache stores top-k rows; this teacher returned full logits")
        frame = rows.frame.with_spans()
        if frame.num_sequences != len(idx):
            raise TeacherProtocolError(f"the teacher answered {frame.num_sequences} sequences for {len(idx)} asked")
        out: dict[int, TopkFrame | None] = {}
        for j, i in enumerate(idx):
            part = frame.select(j, j + 1)
            self.cache.put(keys[i], part)
            out[i] = part
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        try:
            if self.inner is not None:
                self.inner.close()
        finally:
            self.cache.close()
            total = self.hits + self.misses
            logger.info(
                "teacher cache %s: %d of %d sequences were hits (%.0f%%), %d asked of the teacher and written back",
                self.cache.root, self.hits, total, 100 * self.hits / max(total, 1), self.misses,
            )  # fmt: skip


def live_context(config: TrainerConfig) -> CacheContext:
    """The cache context of the live teacher, from its handshake (name, revision, tokenizer, vocabulary)."""

    async def handshake() -> TeacherInfo:
        api_key = os.environ.get(config.teacher_api_key_env) or None
        async with TeacherClient(config.first_teacher_url, api_key=api_key, timeout=config.teacher_timeout) as client:
            return await client.info()

    return context_of(asyncio.run(handshake()), config.top_k, tail=config.tail == "tail")


def context_of(info: TeacherInfo, top_k: int, *, tail: bool) -> CacheContext:
    """The cache context of a teacher's handshake (``/v1/info``) for this top-k and tail mode."""
    return CacheContext(
        model=info.model,
        model_revision=info.model_revision or "",
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        vocab_size=info.vocab_size,
        top_k=top_k,
        temperature=REQUEST_TEMPERATURE,
        logprob_mode=info.logprob_mode,
        tail=tail,
    )


def offline_context(config: TrainerConfig, fingerprint: str, vocab: int) -> CacheContext:
    """The one teacher whose rows the cache holds for this student, k and tail mode (an error otherwise)."""
    assert config.teacher_cache is not None
    wanted = {"tokenizer_fingerprint": fingerprint, "vocab_size": vocab, "top_k": config.top_k,
              "temperature": REQUEST_TEMPERATURE, "tail": config.tail == "tail", "logprobs": "float16"}  # fmt: skip
    present = cached_contexts(config.teacher_cache)
    fits = [c for c in present if all(getattr(c, name) == value for name, value in wanted.items())]
    if len(fits) == 1:
        return fits[0]
    held = "; ".join(f"{c.model}@{c.model_revision} k={c.top_k} tail={c.tail}" for c in present) or "nothing"
    if not fits:
        raise CacheError(
            f"--teacher_cache_offline: {config.teacher_cache} holds no rows for this student's tokenizer with "
            f"--top_k {config.top_k} and --tail {config.tail} (it holds: {held})"
        )
    raise CacheError(
        f"--teacher_cache_offline: {config.teacher_cache} holds rows of several teachers for this student "
        f"({held}); keep one teacher per cache directory"
    )


def open_cached_teacher(
    config: TrainerConfig, tokenizer: Any, vocab: int, open_live: Callable[[], Teacher]
) -> CachedTeacher:
    """``--teacher_cache``: the live teacher (``open_live``, checked as always) behind the cache, or the cache
    alone with ``--teacher_cache_offline``."""
    assert config.teacher_cache is not None
    if config.teacher_cache_offline:
        try:
            context = offline_context(config, tokenizer_fingerprint(tokenizer), vocab)
            cache = TeacherCache(config.teacher_cache, context, writable=False)
        except CacheError as exc:
            raise TeacherCacheMissError(str(exc)) from exc
        logger.info("teacher cache %s: offline, rows of %r", config.teacher_cache, context.model)
        return CachedTeacher(None, cache)
    inner = open_live()
    try:
        cache = TeacherCache(config.teacher_cache, live_context(config))
    except BaseException:
        inner.close()
        raise
    return CachedTeacher(inner, cache)
