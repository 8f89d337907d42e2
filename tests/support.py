"""Helpers the tests share: a fake engine, an in-thread server, the trainer's launcher, and small readers.

Fixtures (the tiny models, a live teacher service) are in conftest.py beside this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from demo.launch import trainer_command
from demo.tiny import TinyAssets
from shared.alignment import row_offsets
from shared.codec import TopkFrame
from teacher_service.engines.base import ScoreJob, TeacherEngine
from teacher_service.process import free_port

REPO = Path(__file__).resolve().parents[1]


# --- the teacher service without a model (HTTP mechanics: readiness, overload, auth)


class FakeEngine(TeacherEngine):
    """A deterministic stand-in engine: no model needed."""

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


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server for ``app`` on a free loopback port, in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("in-thread uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- the trainer, launched as DeepSpeed users do: `deepspeed --num_gpus N --module student_trainer ...`


def launch(
    assets: TinyAssets, out: Path, *extra: str, ranks: int = 2, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trainer_command(assets, out, *extra, ranks=ranks), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ds_config(tmp: Path, base: str = "ds_zero2.json", drop: tuple[str, ...] = (), **overrides: Any) -> Path:
    """A copy of a deploy/ config with top-level keys replaced or dropped."""
    config = json.loads((REPO / "deploy" / base).read_text())
    config.update(overrides)
    for key in drop:
        config.pop(key)
    name = f"{Path(base).stem}-test.json"
    path = tmp / name
    path.write_text(json.dumps(config))
    return path


def failure_output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout[-4000:] + proc.stderr[-4000:]
