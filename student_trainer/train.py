"""The DeepSpeed training loop: teacher rows for step n+1 are fetched while step n trains."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from shared.alignment import padded_positions
from shared.codec import TopkFrame
from shared.fingerprint import tokenizer_fingerprint
from student_trainer.client import TeacherClient
from student_trainer.config import parse_args
from student_trainer.data import Batch, ShardedBatches, load_jsonl
from student_trainer.errors import TeacherError
from student_trainer.loss import gkd_topk_loss
from student_trainer.modeling import RowLogitsLM
from student_trainer.prefetch import TeacherPrefetcher

logger = logging.getLogger("student_trainer")


class TeacherFeed:
    """Micro-batches paired with their teacher futures, ``depth`` requests ahead of training."""

    def __init__(self, batches: Iterator[Batch], prefetcher: TeacherPrefetcher, top_k: int, want_tail: bool) -> None:
        self._batches, self._prefetcher, self._top_k, self._want_tail = batches, prefetcher, top_k, want_tail
        self._queue: deque[tuple[Batch, Future[TopkFrame]]] = deque()
        for _ in range(prefetcher.depth):
            self._enqueue()

    def _enqueue(self) -> None:
        batch = next(self._batches)
        top_k, want_tail = self._top_k, self._want_tail
        fut = self._prefetcher.submit(
            lambda client: client.topk_logprobs(
                batch.sequences, top_k, first_rows=batch.first_rows, return_tail_logmass=want_tail
            )
        )
        self._queue.append((batch, fut))

    def take(self, n: int) -> list[tuple[Batch, Future[TopkFrame]]]:
        """The next ``n`` micro-batches; as each leaves, the request for a later one starts."""
        out = []
        for _ in range(n):
            out.append(self._queue.popleft())
            self._enqueue()
        return out


def all_reduce_sum(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def train(args: argparse.Namespace) -> dict[str, float]:
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    torch.manual_seed(args.seed)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    student = RowLogitsLM(model)
    engine, _, _, _ = deepspeed.initialize(args=args, model=student, model_parameters=student.parameters())
    device = engine.device
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()

    examples = load_jsonl(args.train_file, tokenizer, args.max_length, args.max_completion_length)
    batches = ShardedBatches(examples, micro, rank, world, args.seed, tokenizer.pad_token_id)
    api_key = os.environ.get(args.teacher_api_key_env) or None
    prefetcher = TeacherPrefetcher(
        lambda: TeacherClient(args.teacher_url, timeout=args.teacher_timeout, api_key=api_key),
        depth=args.prefetch_depth,
    )
    vocab = int(model.get_output_embeddings().weight.shape[0])
    info = prefetcher.run(prefetcher.client.check_compatible(vocab, tokenizer_fingerprint(tokenizer), args.top_k))
    if is_main:
        logger.info(
            "student %s, teacher %r at %s; %d ranks x micro-batch %d x accumulation %d, %d steps",
            args.model_name_or_path,
            info.model,
            args.teacher_url,
            world,
            micro,
            gas,
            args.max_steps,
        )

    feed = TeacherFeed(iter(batches), prefetcher, args.top_k, want_tail=args.tail == "tail")
    log_path = out_dir / "train_log.jsonl"
    log_file = log_path.open("w") if is_main else None
    bar = tqdm(total=args.max_steps, desc="distilling", unit="step", disable=not is_main, mininterval=1.0)
    started = time.perf_counter()
    window = {"loss": 0.0, "tokens": 0.0, "wait": 0.0, "t0": time.perf_counter()}
    last_loss = float("nan")
    try:
        for step in range(1, args.max_steps + 1):
            micro_batches = feed.take(gas)
            local_tokens = sum(b.num_target_tokens for b, _ in micro_batches)
            global_tokens = all_reduce_sum(float(local_tokens), device)
            scale = world * gas / global_tokens
            step_loss = 0.0
            for batch, fut in micro_batches:
                t_wait = time.perf_counter()
                frame = fut.result()
                window["wait"] += time.perf_counter() - t_wait
                b_idx, t_idx = padded_positions(batch.attention_mask, batch.first_rows)
                logits = engine(
                    batch.input_ids.to(device), batch.attention_mask.to(device), b_idx.to(device), t_idx.to(device)
                )
                tail_mass = frame.tail_logmass.to(device) if frame.tail_logmass is not None else None
                per_row = gkd_topk_loss(
                    logits,
                    frame.token_ids.to(device),
                    frame.logprobs.to(device),
                    beta=args.beta,
                    temperature=args.temperature,
                    tail=args.tail,
                    teacher_tail_logmass=tail_mass,
                )
                loss_sum = per_row.sum()
                engine.backward(loss_sum * scale)
                engine.step()
                step_loss += float(loss_sum.detach())
            window["loss"] += step_loss
            window["tokens"] += global_tokens
            if step % args.logging_steps == 0 or step == args.max_steps:
                loss_all = all_reduce_sum(window["loss"], device)
                elapsed = time.perf_counter() - window["t0"]
                record = {
                    "step": step,
                    "loss": loss_all / window["tokens"],
                    "tokens_per_s": window["tokens"] / elapsed,
                    "teacher_wait_s": window["wait"],
                    "elapsed_s": time.perf_counter() - started,
                }
                last_loss = record["loss"]
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", wait=f"{window['wait']:.1f}s"
                )
                window = {"loss": 0.0, "tokens": 0.0, "wait": 0.0, "t0": time.perf_counter()}
            bar.update(1)
    finally:
        bar.close()
        prefetcher.close()
        if log_file is not None:
            log_file.close()

    if not args.no_export and is_main:
        export = out_dir / "final"
        model.save_pretrained(export)
        tokenizer.save_pretrained(export)
        logger.info("exported the student to %s", export)
    dist.barrier()
    return {"final_loss": last_loss, "wall_s": time.perf_counter() - started}


def main() -> None:
    args = parse_args()
    try:
        train(args)
    except TeacherError as exc:
        logging.getLogger("student_trainer").error("training stopped: %s", exc)
        sys.exit(2)
