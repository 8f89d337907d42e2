"""The on-disk teacher cache: keys that change with every part of the context, sealed shards other
processes read, concurrent writers, and damaged or foreign files ignored with a warning, never trusted."""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from shared.codec import TopkFrame
from shared.teacher_cache import CacheContext, TeacherCache, cached_contexts

CONTEXT = CacheContext(
    model="teacher", model_revision="r1", tokenizer_fingerprint="sha256:x", vocab_size=151_936, top_k=4, tail=True
)


def _sequence(seed: int, k: int = 4) -> tuple[list[int], list[tuple[int, int]], TopkFrame]:
    gen = torch.Generator().manual_seed(seed)
    length = 12 + seed % 7
    ids = torch.randint(0, 151_936, (length,), generator=gen).tolist()
    spans = [(2, 5), (7, length - 1)]
    rows = 3 + (length - 1 - 7)
    frame = TopkFrame.from_spans(
        torch.randint(0, 151_936, (rows, k), generator=gen, dtype=torch.int32),
        (-torch.rand(rows, k, generator=gen) * 9).sort(dim=-1, descending=True).values.half(),
        [spans],
        [length],
        tail_logmass=-torch.rand(rows, generator=gen),
    )
    return ids, spans, frame


def _same(a: TopkFrame, b: TopkFrame) -> bool:
    return (
        torch.equal(a.token_ids, b.token_ids)
        and torch.equal(a.logprobs, b.logprobs)
        and torch.equal(a.tail_logmass, b.tail_logmass)
        and a.spans() == b.spans()
    )


def test_rows_come_back_exactly_and_other_processes_see_them_once_sealed(tmp_path: Path) -> None:
    writer = TeacherCache(tmp_path, CONTEXT)
    seqs = [_sequence(s) for s in range(5)]
    keys = [CONTEXT.key(ids, spans) for ids, spans, _ in seqs]
    assert len(set(keys)) == 5
    for key, (_, _, frame) in zip(keys, seqs, strict=True):
        writer.put(key, frame)
    got = writer.get(keys)  # its own records, before sealing
    assert all(g is not None and _same(g, f) for g, (_, _, f) in zip(got, seqs, strict=True))
    assert TeacherCache(tmp_path, CONTEXT, writable=False).locate(keys) == {}  # unsealed: invisible to others
    writer.close()
    reader = TeacherCache(tmp_path, CONTEXT, writable=False)
    got = reader.get(keys)
    assert all(g is not None and _same(g, f) for g, (_, _, f) in zip(got, seqs, strict=True))
    assert cached_contexts(tmp_path) == [CONTEXT]


@pytest.mark.parametrize(
    "other",
    [
        {"model_revision": "r2"},
        {"model": "other-teacher"},
        {"tokenizer_fingerprint": "sha256:y"},
        {"top_k": 8},
        {"temperature": 0.7},
        {"tail": False},
    ],
)
def test_another_teacher_k_temperature_or_tail_mode_gets_no_hits(
    tmp_path: Path, other: dict, caplog: pytest.LogCaptureFixture
) -> None:
    ids, spans, frame = _sequence(0)
    with TeacherCache(tmp_path, CONTEXT) as writer:
        writer.put(CONTEXT.key(ids, spans), frame)
    foreign = replace(CONTEXT, **other)
    assert foreign.key(ids, spans) != CONTEXT.key(ids, spans)
    with caplog.at_level(logging.WARNING):
        reader = TeacherCache(tmp_path, foreign, writable=False)
    assert reader.locate([foreign.key(ids, spans), CONTEXT.key(ids, spans)]) == {}
    assert "another teacher or settings" in caplog.text


def test_key_covers_ids_and_spans() -> None:
    ids, spans, _ = _sequence(0)
    key = CONTEXT.key(ids, spans)
    assert CONTEXT.key(ids, spans) == key
    assert CONTEXT.key([*ids[:-1], ids[-1] + 1], spans) != key
    assert CONTEXT.key(ids, [(2, 5)]) != key
    assert CONTEXT.key(ids, [(2, 6), (7, len(ids) - 1)]) != key


def test_damaged_and_foreign_files_are_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seqs = [_sequence(s) for s in range(4)]
    keys = [CONTEXT.key(ids, spans) for ids, spans, _ in seqs]
    with TeacherCache(tmp_path / "a", CONTEXT) as w:
        for key, (_, _, frame) in zip(keys[:2], seqs[:2], strict=True):
            w.put(key, frame)
    with TeacherCache(tmp_path / "b", CONTEXT) as w:
        for key, (_, _, frame) in zip(keys[2:], seqs[2:], strict=True):
            w.put(key, frame)
    (shard_a,) = (tmp_path / "a").glob("*.shard")
    shard_a.write_bytes(shard_a.read_bytes()[:-10])  # truncated
    (shard_b,) = (tmp_path / "b").glob("*.shard")
    data = bytearray(shard_b.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the last record's payload
    shard_b.write_bytes(bytes(data))
    (tmp_path / "b" / "notes.txt").write_text("not a shard")
    (tmp_path / "b" / "junk.idx").write_bytes(b"not sqlite at all" * 10)
    with caplog.at_level(logging.WARNING):
        a = TeacherCache(tmp_path / "a", CONTEXT, writable=False)
        assert a.locate(keys[:2]) == {}
        assert "truncated" in caplog.text
        b = TeacherCache(tmp_path / "b", CONTEXT, writable=False)
        assert "notes.txt" in caplog.text and "junk.idx" in caplog.text
        got = b.get(keys[2:])
    assert got[0] is not None and _same(got[0], seqs[2][2])
    assert got[1] is None and "checksum" in caplog.text


def _write_many(root: str, worker: int, n: int) -> None:
    with TeacherCache(root, CONTEXT, seal_bytes=20_000) as cache:  # several seals each
        for s in range(n):
            ids, spans, frame = _sequence(s % 30 + 1000 * (s % 2) * worker)
            cache.put(CONTEXT.key(ids, spans), frame)


def test_concurrent_writers_do_not_corrupt_the_cache(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), w, 60)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert len(list(tmp_path.glob("*.shard"))) >= 4 and not list(tmp_path.glob("*.part"))
    seeds = sorted({s % 30 + 1000 * (s % 2) * w for w in (1, 2) for s in range(60)})
    seqs = [_sequence(s) for s in seeds]
    reader = TeacherCache(tmp_path, CONTEXT, writable=False)
    got = reader.get([CONTEXT.key(ids, spans) for ids, spans, _ in seqs])
    assert all(g is not None and _same(g, f) for g, (_, _, f) in zip(got, seqs, strict=True))
