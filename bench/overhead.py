"""HTTP overhead: rows per second through the service versus calling the engine in-process, same batches.

The service runs as its own process (`python -m teacher_service`, transformers engine,
tiny local teacher); the client sends one micro-batch per request and decodes the binary
frame. Direct and HTTP runs alternate so that machine load drifts hit both alike.

    python -m bench.overhead --batches 20 --batch-size 16 --seq-len 256 --k 20
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from bench.common import machine
from demo.tiny import build_assets
from student_trainer.teacher import TeacherClient
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.hf import HFEngine
from teacher_service.process import TeacherProcess


def make_batches(n: int, batch_size: int, seq_len: int, vocab: int) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=gen).tolist() for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="alternating direct/HTTP rounds")
    p.add_argument("--cache", type=Path, default=Path("runs/cache"))
    args = p.parse_args()
    assets = build_assets(args.cache)
    engine = HFEngine(assets.teacher, dtype="float32")
    engine.load()
    batches = make_batches(args.batches, args.batch_size, args.seq_len, engine.vocab_size)
    rows = args.batches * args.batch_size * (args.seq_len - 1)

    def direct() -> float:
        t0 = time.perf_counter()
        for b in batches:
            engine.score_sync(ScoreJob.from_first_rows(b, [0] * len(b), args.k))
        return time.perf_counter() - t0

    async def http(url: str) -> float:
        async with TeacherClient(url) as client:
            await client.info()
            t0 = time.perf_counter()
            for b in batches:
                await client.topk_logprobs(b, args.k)
            return time.perf_counter() - t0

    t_direct, t_http = [], []
    with TeacherProcess(assets.teacher, extra_args=["--dtype", "float32"]) as proc:
        asyncio.run(http(proc.url))  # warm-up
        direct()
        for _ in range(args.rounds):
            t_direct.append(direct())
            t_http.append(asyncio.run(http(proc.url)))
    d, h = min(t_direct), min(t_http)
    print(f"machine: {machine()}")
    print(
        f"{args.batches} batches x {args.batch_size} sequences x {args.seq_len} tokens, k={args.k}; "
        f"best of {args.rounds} alternating rounds\n"
    )
    print("| path | rows/s |\n|---|---|")
    print(f"| engine in-process | {rows / d:,.0f} |")
    print(f"| HTTP (service process + client decode) | {rows / h:,.0f} |")
    print(f"\nHTTP / in-process throughput: {d / h:.2f}")


if __name__ == "__main__":
    main()
