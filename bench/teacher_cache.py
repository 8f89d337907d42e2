"""The teacher cache's hit path against the live teacher service, in the same run on the same micro-batches.

The tiny teacher of ``demo/tiny.py`` is served in its own process (transformers engine); the chat data's
first ``--examples`` conversations make micro-batches of ``--batch`` sequences (their assistant rows only,
as the trainer sends them). Three passes over the same micro-batches, each request waited for before the
next (no prefetch, so the figure is the path's own cost): the live teacher alone; ``--teacher_cache`` on an
empty cache (every sequence a miss: asked, then written); and again (every sequence a hit: read, checked
and decoded from disk). Rows per second of loss rows delivered to the step.

    python -m bench.teacher_cache --examples 512 --batch 8 --k 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from bench.common import machine
from demo.tiny import build_assets
from shared.protocol import TeacherInfo
from shared.teacher_cache import TeacherCache
from student_trainer.data import Batch, collate, load_jsonl
from student_trainer.teacher import ServiceTeacher, TeacherClient, TeacherPrefetcher, TeacherRouter
from student_trainer.teacher.cache import CachedTeacher, context_of
from teacher_service.process import TeacherProcess


async def handshake(url: str) -> TeacherInfo:
    async with TeacherClient(url) as client:
        return await client.info()


def rows_per_s(teacher: object, batches: list[Batch]) -> float:
    started = time.perf_counter()
    rows = 0
    for batch in batches:
        got = teacher.request(batch).result()  # type: ignore[attr-defined]
        rows += int(got.frame.token_ids.shape[0])
    return rows / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--cache", type=Path, default=Path("runs/cache"), help="where the tiny models are built")
    args = p.parse_args()
    assets = build_assets(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(assets.student)
    examples = load_jsonl(assets.chat_train_file, tokenizer, max_length=512)[: args.examples]
    batches = [
        collate(examples[i : i + args.batch], tokenizer.pad_token_id) for i in range(0, len(examples), args.batch)
    ]
    rows = sum(b.num_target_tokens for b in batches)
    print(
        f"machine: {machine()}; {len(batches)} micro-batches of {args.batch} conversations, "
        f"{rows} loss rows, k={args.k}\n"
    )
    with (
        TeacherProcess(assets.teacher, extra_args=["--max-top-k", str(args.k)]) as server,
        tempfile.TemporaryDirectory() as tmp,
    ):

        def service() -> ServiceTeacher:
            prefetcher = TeacherPrefetcher(lambda: TeacherRouter({"default": TeacherClient(server.url)}))
            return ServiceTeacher(prefetcher, args.k, True, prefetch=False)

        live = service()
        live.request(batches[0]).result()  # warm-up
        live_rps = rows_per_s(live, batches)
        info = live.prefetcher.run(handshake(server.url))
        cached = CachedTeacher(service(), TeacherCache(tmp, context_of(info, args.k, tail=True)))
        miss_rps = rows_per_s(cached, batches)
        hit_rps = rows_per_s(cached, batches)
        assert cached.hits + cached.misses == 2 * len(examples) and cached.hits >= len(examples)  # repeats: hits
        cached.close()
        live.close()
    print("| path | rows/s | vs live teacher |")
    print("|---|---|---|")
    print(f"| live teacher service | {live_rps:,.0f} | 1.00x |")
    print(f"| --teacher_cache, all misses (asked + written) | {miss_rps:,.0f} | {miss_rps / live_rps:.2f}x |")
    print(f"| --teacher_cache, all hits (read + checked + decoded) | {hit_rps:,.0f} | {hit_rps / live_rps:.2f}x |")


if __name__ == "__main__":
    main()
