"""--teacher_cache in front of a live teacher service: two epochs of real micro-batches, the second asking
the teacher nothing, with rows and losses equal to the live teacher's; an offline cache alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from demo.tiny import TinyAssets
from shared.teacher_cache import TeacherCache
from student_trainer.config import TrainerConfig
from student_trainer.data import Batch, ShardedBatches, load_jsonl
from student_trainer.loss import LossConfig
from student_trainer.teacher import ServiceTeacher, TeacherClient, TeacherPrefetcher
from student_trainer.teacher.cache import CachedTeacher, TeacherCacheMissError, live_context, open_cached_teacher
from student_trainer.teacher.rows import Handle, TeacherRows, TopkRows
from teacher_service.process import TeacherProcess

K = 8


class Counting:
    """A teacher that counts the micro-batches and sequences it is asked for."""

    can_generate = False

    def __init__(self, inner: ServiceTeacher) -> None:
        self.inner, self.requests, self.sequences = inner, 0, 0

    def request(self, batch: Batch) -> Handle[TeacherRows]:
        self.requests += 1
        self.sequences += len(batch.sequences)
        return self.inner.request(batch)

    def close(self) -> None:
        self.inner.close()


def _service(url: str) -> ServiceTeacher:
    return ServiceTeacher(TeacherPrefetcher(lambda: TeacherClient(url)), K, want_tail=True, prefetch=True)


def _config(tmp: Path, url: str, *extra: str, **kw: object) -> TrainerConfig:
    return TrainerConfig(
        model_name_or_path="unused", dataset="unused", output_dir=str(tmp / "out"), max_steps=1,
        deepspeed_config="unused.json", teacher_url=url, top_k=K,
        tail="tail", teacher_cache=str(tmp / "cache"), **kw,
    )  # fmt: skip


def test_second_epoch_asks_the_teacher_nothing_and_matches_the_live_rows(
    tmp_path: Path, tiny_assets: TinyAssets, teacher_server: TeacherProcess
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.student)
    examples = load_jsonl(tiny_assets.chat_train_file, tokenizer, max_length=256)[:24]
    per_epoch = len(examples) // 4
    config = _config(tmp_path, teacher_server.url)
    counting = Counting(_service(teacher_server.url))
    cached = CachedTeacher(counting, TeacherCache(config.teacher_cache, live_context(config)))
    live = _service(teacher_server.url)
    loss = LossConfig(beta=0.5, temperature=1.0, tail="tail")
    batches = iter(ShardedBatches(examples, 4, 0, 1, seed=3, pad_id=tokenizer.pad_token_id))
    try:
        for epoch in (1, 2):
            before = counting.requests
            for _ in range(per_epoch):
                batch = next(batches)
                got, want = cached.request(batch).result(), live.request(batch).result()
                assert isinstance(got, TopkRows) and isinstance(want, TopkRows)
                assert torch.equal(got.frame.token_ids, want.frame.token_ids)
                assert torch.equal(got.frame.logprobs, want.frame.logprobs)
                # float32 tail masses: the live teacher's own forward varies in the last bits with the batch
                torch.testing.assert_close(got.frame.tail_logmass, want.frame.tail_logmass, rtol=0, atol=1e-5)
                assert got.frame.spans() == batch.row_spans
                logits = torch.randn(int(got.frame.token_ids.shape[0]), tokenizer.vocab_size + 8)
                torch.testing.assert_close(
                    got.gkd_loss(logits, loss), want.gkd_loss(logits, loss), rtol=1e-5, atol=1e-6
                )
            asked = counting.requests - before
            assert asked == (per_epoch if epoch == 1 else 0), f"epoch {epoch} asked the teacher {asked} times"
        assert cached.hits == cached.misses == per_epoch * 4
    finally:
        cached.close()
        live.close()

    # the teacher down: an offline run reads the same rows from the sealed shards alone
    down = _config(tmp_path, "http://127.0.0.1:9", teacher_cache_offline=True)
    offline = open_cached_teacher(down, tokenizer, tokenizer.vocab_size, lambda: pytest.fail("contacted a teacher"))
    try:
        batch = next(iter(ShardedBatches(examples, 4, 0, 1, seed=3, pad_id=tokenizer.pad_token_id)))
        assert isinstance(offline.request(batch).result(), TopkRows)
        unseen = load_jsonl(tiny_assets.chat_eval_file, tokenizer, max_length=256)[:4]
        with pytest.raises(TeacherCacheMissError, match="not in"):
            offline.request(next(iter(ShardedBatches(unseen, 4, 0, 1, seed=3, pad_id=tokenizer.pad_token_id))))
    finally:
        offline.close()
    with pytest.raises(TeacherCacheMissError, match=r"holds no rows.*--top_k 4"):
        open_cached_teacher(replace(down, top_k=4), tokenizer, tokenizer.vocab_size, lambda: pytest.fail("asked"))
