"""The prefetching feed: data position of consumed batches, the lmbda schedule, failures that stop training."""

from __future__ import annotations

import httpx
import pytest
import torch

from shared.codec import TopkFrame, encode_frame
from shared.protocol import TOPK_MEDIA_TYPE, RequestLimits, TeacherInfo
from student_trainer.data import Example, ShardedBatches
from student_trainer.schedule import derived_seed, step_source
from student_trainer.teacher import TeacherClient, TeacherRouter
from student_trainer.teacher.errors import TeacherUnavailableError
from student_trainer.teacher.feed import TeacherFeed
from student_trainer.teacher.prefetch import TeacherPrefetcher
from student_trainer.teacher.rows import Deferred
from student_trainer.teacher.service import ServiceTeacher

EXAMPLES = [Example.completion([1, 2 + i % 5, 3, 4, 5][: 3 + i % 3], 2) for i in range(40)]


def batches(seed: int = 0) -> ShardedBatches:
    return ShardedBatches(EXAMPLES, micro_batch=4, rank=0, world=1, seed=seed, pad_id=0)


def test_checkpoint_position_is_the_last_consumed_batch_not_the_read_ahead() -> None:
    requested = []
    feed = TeacherFeed(
        iter(batches()),
        lambda b: requested.append(b) or Deferred(lambda: None),
        depth=3,
        micro_per_step=2,
        first_step=1,
        ahead=lambda step: True,
    )
    taken = feed.take(2) + feed.take(2)
    assert len(requested) == 4 + 3  # read ahead by the prefetch depth
    assert feed.consumed_state == {"epoch": 0, "index": 16}  # 4 micro-batches of 4 consumed

    resumed = batches()
    resumed.load_state_dict(feed.consumed_state)
    uninterrupted = iter(batches())
    for _ in range(4):
        next(uninterrupted)
    assert next(iter(resumed)).sequences == next(uninterrupted).sequences
    assert [b.sequences for b, _ in taken] == [r.sequences for r in requested[:4]]


def test_depth_zero_requests_only_what_is_consumed() -> None:
    requested = []
    feed = TeacherFeed(
        iter(batches()),
        lambda b: requested.append(b) or Deferred(lambda: None),
        depth=0,
        micro_per_step=2,
        first_step=1,
        ahead=lambda step: True,
    )
    assert requested == []
    feed.take(2)
    assert len(requested) == 2 and feed.consumed_state == {"epoch": 0, "index": 8}


def test_only_dataset_steps_are_requested_ahead() -> None:
    requested = []
    feed = TeacherFeed(
        iter(batches()),
        lambda b: requested.append(b) or Deferred(lambda: None),
        depth=4,
        micro_per_step=2,
        first_step=1,
        ahead=lambda step: step != 2,
    )
    step1, step2 = feed.take(2), feed.take(2)
    assert all(h is not None for _, h in step1) and all(h is None for _, h in step2)


def test_schedule_is_seeded_by_step_and_matches_lmbda() -> None:
    draws = [step_source(7, s, 0.3, False) for s in range(1, 2001)]
    assert draws == [step_source(7, s, 0.3, False) for s in range(1, 2001)]  # every rank computes the same
    assert 0.25 < draws.count("student") / len(draws) < 0.35
    assert set(step_source(7, s, 0.0, True) for s in range(50)) == {"teacher"}
    assert set(step_source(7, s, 1.0, True) for s in range(50)) == {"student"}
    assert derived_seed(1, 2) != derived_seed(2, 1)


def _frame(n: int, k: int) -> bytes:
    """The answer to one sequence whose rows 0..n-1 are asked for by row spans (the service teacher's way)."""
    return encode_frame(
        TopkFrame.from_spans(
            torch.zeros(n, k, dtype=torch.int32), torch.full((n, k), -1.0), [[(0, n)]], [n + 1], metadata={"model": "m"}
        )
    )


def test_teacher_down_mid_feed_raises_a_typed_error_and_fills_nothing() -> None:
    """Two micro-batches are answered, then the teacher is gone: the third raises, never returns rows."""
    answered = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/info":
            info = TeacherInfo(
                model="m",
                vocab_size=10,
                tokenizer_fingerprint="f",
                max_top_k=4,
                limits=RequestLimits(max_top_k=4, max_sequences=8, max_tokens=99, max_body_bytes=999),
                engine="mock",
            )
            return httpx.Response(200, content=info.model_dump_json())
        if len(answered) >= 2:
            raise httpx.ConnectError("connection refused", request=request)
        answered.append(1)
        return httpx.Response(200, content=_frame(2, 2), headers={"content-type": TOPK_MEDIA_TYPE})

    transport = httpx.MockTransport(handler)
    prefetcher = TeacherPrefetcher(
        lambda: TeacherRouter(
            {"default": TeacherClient("http://t", transport=transport, max_retries=2, backoff_base=0.001)}
        ),
        depth=2,
    )
    teacher = ServiceTeacher(prefetcher, top_k=2, want_tail=False, prefetch=True)
    data = iter(ShardedBatches([Example.completion([1, 2, 3], 1)] * 8, 1, 0, 1, 0, 0))
    try:
        feed = TeacherFeed(data, teacher.request, depth=2, micro_per_step=1, first_step=1, ahead=lambda s: True)
        for _ in range(2):
            ((_, handle),) = feed.take(1)
            assert handle is not None and handle.result().frame.token_ids.shape == (2, 2)
        ((_, handle),) = feed.take(1)
        with pytest.raises(TeacherUnavailableError, match="unreachable after 3 attempts"):
            handle.result()
    finally:
        teacher.close()
