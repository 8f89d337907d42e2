"""A deterministic stand-in engine for HTTP-mechanics tests (readiness, overload, auth): no model needed."""

from __future__ import annotations

import asyncio

import torch

from shared.alignment import row_offsets
from shared.codec import TopkFrame
from teacher_service.engines.base import ScoreJob, TeacherEngine


class FakeEngine(TeacherEngine):
    engine_name = "fake"

    def __init__(self, delay_s: float = 0.0, vocab: int = 100) -> None:
        super().__init__("fake-teacher")
        self.delay_s, self._vocab = delay_s, vocab
        self.loaded = asyncio.Event()
        self.release_start = True
        self.calls: list[int] = []
        self.fail_next = False

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def tokenizer_fingerprint(self) -> str:
        return "sha256:fake"

    @property
    def max_model_len(self) -> int:
        return 4096

    async def start(self) -> None:
        while not self.release_start:
            await asyncio.sleep(0.01)
        self.loaded.set()

    async def score(self, job: ScoreJob) -> TopkFrame:
        self.calls.append(len(job.sequences))
        await asyncio.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated engine failure")
        offsets = row_offsets([len(s) for s in job.sequences], job.first_rows)
        n = int(offsets[-1])
        ids = torch.arange(job.top_k, dtype=torch.int32).repeat(n, 1)
        lps = -torch.arange(1, job.top_k + 1, dtype=torch.float32).repeat(n, 1)
        return TopkFrame(ids, lps, offsets, torch.tensor(job.first_rows, dtype=torch.int64))
