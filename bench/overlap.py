"""Does prefetching hide the teacher? Student step time against a live teacher service, depth 2 vs 0.

Starts the teacher service on a free port, then on the same micro-batches measures
(1) the teacher alone: one request per micro-batch, back to back;
(2) the student alone: forward + GKD loss + backward + AdamW on rows fetched beforehand;
(3) training with ``--prefetch_depth 0``: each micro-batch's rows requested when needed;
(4) training with ``--prefetch_depth 2``: the trainer's own TeacherFeed + ServiceTeacher.
The goal is (4) <= 1.15 x max((1), (2)). The student runs in this process with plain
PyTorch (the DeepSpeed engine adds the same per-step cost to every mode); each side gets
``--threads`` intra-op threads so teacher and student do not fight over the same cores.

    python bench/overlap.py --micro-batch 16 --steps 30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from demo.tiny import build_assets
from student_trainer.data import Batch, ShardedBatches, load_jsonl
from student_trainer.loss import LossConfig
from student_trainer.modeling import RowLogitsLM
from student_trainer.teacher import TeacherClient, TeacherRouter
from student_trainer.teacher.feed import TeacherFeed
from student_trainer.teacher.prefetch import TeacherPrefetcher
from student_trainer.teacher.rows import TeacherRows, TopkRows
from student_trainer.teacher.service import ServiceTeacher
from teacher_service.process import TeacherProcess

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "cache", help="tiny model cache (demo.tiny)")
    p.add_argument("--teacher", type=Path, help="teacher model dir (default: the tiny teacher)")
    p.add_argument("--student", type=Path, help="student model dir (default: the tiny student)")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--steps", type=int, default=30, help="timed micro-batches per mode (after 3 warm-up ones)")
    p.add_argument("--top-k", type=int, default=16, help="teacher top-k")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the student and for the teacher")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = build_assets(args.cache)
    teacher_dir, student_dir = args.teacher or assets.teacher, args.student or assets.student
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(student_dir)
    examples = load_jsonl(assets.train_file, tok, max_length=256)
    warm = 3
    n = warm + args.steps

    def batches() -> ShardedBatches:
        return ShardedBatches(examples, args.micro_batch, 0, 1, 0, tok.pad_token_id)

    env = {"OMP_NUM_THREADS": str(args.threads)}
    with TeacherProcess(teacher_dir, extra_args=["--max-top-k", str(args.top_k)], env=env) as server:

        def make_prefetcher() -> TeacherPrefetcher[TeacherRouter]:
            return TeacherPrefetcher(lambda: TeacherRouter({"default": TeacherClient(server.url)}), depth=2)

        # (1) teacher alone
        pre = make_prefetcher()
        it = iter(batches())
        frames, teacher_times = [], []
        for i in range(n):
            b = next(it)
            t0 = time.perf_counter()
            frames.append(
                pre.run(
                    pre.client.topk_logprobs(
                        b.teachers, b.sequences, args.top_k, row_spans=b.row_spans, return_tail_logmass=True
                    )
                )
            )
            if i >= warm:
                teacher_times.append(time.perf_counter() - t0)
        pre.close()

        model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        student = RowLogitsLM(model)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        loss = LossConfig(beta=0.5, temperature=1.0, tail="tail")

        def train_step(batch: Batch, rows: TeacherRows) -> None:
            b_idx, t_idx = batch.row_index()
            logits = student(batch.input_ids, batch.attention_mask, b_idx, t_idx)
            rows.gkd_loss(logits, loss).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # (2) student alone
        it = iter(batches())
        student_times = []
        for i in range(n):
            b = next(it)
            t0 = time.perf_counter()
            train_step(b, TopkRows(frames[i]))
            if i >= warm:
                student_times.append(time.perf_counter() - t0)

        def trained(depth: int) -> list[float]:
            pre = make_prefetcher()
            teacher = ServiceTeacher(pre, args.top_k, want_tail=True, prefetch=depth > 0)
            feed = TeacherFeed(iter(batches()), teacher.request, depth, 1, 1, lambda s: True)
            times = []
            try:
                for i in range(n):
                    t0 = time.perf_counter()
                    ((b, handle),) = feed.take(1)
                    train_step(b, handle.result())
                    if i >= warm:
                        times.append(time.perf_counter() - t0)
            finally:
                teacher.close()
            return times

        sync_times, overlap_times = trained(0), trained(2)

    res = {
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "teacher_s": statistics.median(teacher_times),
        "student_s": statistics.median(student_times),
        "depth0_s": statistics.median(sync_times),
        "depth2_s": statistics.median(overlap_times),
    }
    bound = max(res["teacher_s"], res["student_s"])
    res["depth2_over_max"] = res["depth2_s"] / bound
    res["depth0_over_sum"] = res["depth0_s"] / (res["teacher_s"] + res["student_s"])
    print(json.dumps(res, indent=2))
    print("\n| teacher alone | student alone | depth 0 (sync) | depth 2 (prefetch) | depth 2 / max(teacher, student) |")
    print("|---|---|---|---|---|")
    print(
        f"| {res['teacher_s'] * 1e3:.0f} ms | {res['student_s'] * 1e3:.0f} ms | {res['depth0_s'] * 1e3:.0f} ms | "
        f"{res['depth2_s'] * 1e3:.0f} ms | {res['depth2_over_max']:.2f} |"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
