"""Micro-batching: 16 concurrent clients sending one sequence per request, with and without merging.

Two service processes on the same tiny teacher: `--max-batch-requests 1` (every request
is its own forward pass) and the default micro-batcher. Each client sends the same
sequences in the same order; throughput is sequences per second over the whole run.

    python -m bench.batching --clients 16 --requests 20 --seq-len 128 --k 20
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
from teacher_service.process import TeacherProcess


async def run_clients(url: str, seqs: list[list[list[int]]], k: int) -> float:
    async def one(client_seqs: list[list[int]]) -> None:
        async with TeacherClient(url) as client:
            for s in client_seqs:
                await client.topk_logprobs([s], k)

    t0 = time.perf_counter()
    await asyncio.gather(*[one(s) for s in seqs])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--cache", type=Path, default=Path("runs/cache"))
    args = p.parse_args()
    assets = build_assets(args.cache)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 500, (args.requests, args.seq_len), generator=gen).tolist() for _ in range(args.clients)]
    total = args.clients * args.requests
    results = {}
    for label, extra in [
        ("one request per forward pass", ["--max-batch-requests", "1"]),
        ("micro-batching (default)", []),
    ]:
        with TeacherProcess(assets.teacher, extra_args=["--dtype", "float32", *extra]) as proc:
            asyncio.run(run_clients(proc.url, [s[:2] for s in seqs], args.k))  # warm-up
            results[label] = total / asyncio.run(run_clients(proc.url, seqs, args.k))
    print(f"machine: {machine()}")
    print(
        f"{args.clients} concurrent clients x {args.requests} requests, one {args.seq_len}-token sequence each, "
        f"k={args.k}\n"
    )
    print("| service | sequences/s |\n|---|---|")
    for label, rate in results.items():
        print(f"| {label} | {rate:,.1f} |")
    base, batched = results.values()
    print(f"\nmicro-batching speed-up: {batched / base:.2f}x")


if __name__ == "__main__":
    main()
