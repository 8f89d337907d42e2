"""Wire cost of a chat dataset: teacher rows and bytes per conversation, whole sequences against row spans.

Encodes the tiny chat eval set as the trainer does (the student tokenizer's chat template, loss on every
assistant turn), serves the tiny teacher, and asks for the same conversations three ways: every row
(``first_rows`` 0), from the first assistant turn on (what a single ``first_rows`` can say), and the
assistant turns' row spans only. The span rows are checked equal to the same rows of the full answer.

    python -m bench.spans --conversations 256 --top-k 20
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.common import machine
from demo.tiny import build_assets
from shared.alignment import rows_of_spans
from shared.codec import TopkFrame, encode_frame
from student_trainer.data import load_jsonl
from student_trainer.teacher import TeacherClient
from teacher_service.process import TeacherProcess

ROOT = Path(__file__).resolve().parents[1]


async def measure(url: str, seqs: list[list[int]], spans: list[list[tuple[int, int]]], k: int, batch: int) -> dict:
    totals = {mode: [0, 0] for mode in ("full", "first_rows", "spans")}
    async with TeacherClient(url) as client:
        for lo in range(0, len(seqs), batch):
            s, sp = seqs[lo : lo + batch], spans[lo : lo + batch]
            asks = {
                "full": {"first_rows": [0] * len(s)},
                "first_rows": {"first_rows": [x[0][0] for x in sp]},
                "spans": {"row_spans": sp},
            }
            frames: dict[str, TopkFrame] = {}
            for mode, kwargs in asks.items():
                frames[mode] = await client.topk_logprobs(s, k, return_tail_logmass=True, **kwargs)
                totals[mode][0] += int(frames[mode].token_ids.shape[0])
                totals[mode][1] += len(encode_frame(frames[mode]))  # the frame as it came over the wire
            picks = rows_of_spans(sp, [0] * len(s), [len(x) - 1 for x in s])
            assert torch.equal(frames["spans"].token_ids, frames["full"].token_ids[picks])
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "cache", help="tiny model cache (demo.tiny)")
    p.add_argument("--conversations", type=int, default=256, help="conversations of the chat eval set")
    p.add_argument("--top-k", type=int, default=20, help="teacher top-k")
    p.add_argument("--batch", type=int, default=16, help="conversations per request")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    assets = build_assets(args.cache)
    tok = AutoTokenizer.from_pretrained(assets.student)
    examples = list(load_jsonl(assets.chat_eval_file, tok, max_length=256))[: args.conversations]
    seqs, spans = [e.input_ids for e in examples], [list(e.row_spans) for e in examples]
    with TeacherProcess(assets.teacher, extra_args=["--max-top-k", str(args.top_k)]) as server:
        totals = asyncio.run(measure(server.url, seqs, spans, args.top_k, args.batch))
    n = len(seqs)
    print(f"machine: {machine()}; {n} conversations, {sum(map(len, seqs)) / n:.1f} tokens each, k={args.top_k}\n")
    print("| rows asked | rows/conversation | bytes/conversation | bytes vs full |")
    print("|---|---|---|---|")
    for mode, (rows, size) in totals.items():
        print(f"| {mode} | {rows / n:.1f} | {size / n:.0f} | {size / totals['full'][1]:.2f} |")


if __name__ == "__main__":
    main()
