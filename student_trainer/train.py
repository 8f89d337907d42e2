"""The DeepSpeed training loop: teacher rows for the next micro-batches are fetched while this one trains."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from shared.alignment import next_token_labels
from shared.fingerprint import tokenizer_fingerprint
from student_trainer.checkpoint import CHECKPOINTS_DIR, load_checkpoint, resolve_resume, save_checkpoint
from student_trainer.client import TOKENIZER_PROBE, make_client
from student_trainer.config import describe, parse_args
from student_trainer.data import Batch, ShardedBatches, load_jsonl
from student_trainer.errors import TeacherError
from student_trainer.evaluate import sharded_eval
from student_trainer.feed import TeacherFeed
from student_trainer.generation import generate_completions
from student_trainer.logs import RunLog
from student_trainer.loss import completion_cross_entropy
from student_trainer.modeling import RowLogitsLM
from student_trainer.normalization import all_reduce_sum, loss_scale
from student_trainer.prefetch import TeacherPrefetcher
from student_trainer.schedule import Source, derived_seed, step_source
from student_trainer.teachers import Handle, LocalTeacher, ServiceTeacher, Teacher, TeacherRows, row_index

logger = logging.getLogger("student_trainer")


class NonFiniteLossError(RuntimeError):
    """A micro-batch's loss is NaN or infinite: training stops rather than stepping on it."""


def open_teacher(args: argparse.Namespace, tokenizer: Any, vocab: int) -> Teacher:
    """The teacher, checked against the student's tokenizer before any student weights load."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if args.teacher_model_name_or_path is not None:
        return LocalTeacher(args.teacher_model_name_or_path, fingerprint, vocab)
    api_key = os.environ.get(args.teacher_api_key_env) or None
    prefetcher = TeacherPrefetcher(
        lambda: make_client(
            args.teacher_api,
            args.teacher_url,
            timeout=args.teacher_timeout,
            api_key=api_key,
            max_retries=args.teacher_max_retries,
        ),
        depth=max(args.prefetch_depth, 1),
    )
    try:
        probe = (TOKENIZER_PROBE, tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids)
        info = prefetcher.run(prefetcher.client.check_compatible(vocab, fingerprint, args.top_k, probe=probe))
    except BaseException:
        prefetcher.close()
        raise
    logger.info("teacher %r at %s (%s API)", info.model, args.teacher_url, args.teacher_api)
    return ServiceTeacher(prefetcher, args.top_k, want_tail=args.tail == "tail", prefetch=args.prefetch_depth > 0)


def export_pretrained(engine: Any, model: torch.nn.Module, tokenizer: Any, out: Path, is_main: bool) -> None:
    """``save_pretrained`` of the trained student; ZeRO-3 shards are gathered parameter by parameter."""
    import deepspeed

    state = None
    if engine.zero_optimization_stage() == 3:
        state = {}
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_main:
                    state[name] = param.detach().cpu().clone()
    if is_main:
        model.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
        logger.info("exported the student to %s", out)


def train(args: argparse.Namespace) -> dict[str, float]:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per teacher request is noise
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        logger.info("flags: %s", describe(args))

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    vocab = int(AutoConfig.from_pretrained(args.model_name_or_path).vocab_size)
    teacher = open_teacher(args, tokenizer, vocab)
    try:
        return _train(args, teacher, tokenizer, rank, world, out_dir, deepspeed, AutoModelForCausalLM)
    finally:
        teacher.close()


def _generated(
    args: argparse.Namespace,
    source: Source,
    batch: Batch,
    engine: Any,
    teacher: Teacher,
    tokenizer: Any,
    step: int,
    micro: int,
) -> Batch:
    """The micro-batch's prompts with completions sampled from the student or the teacher."""
    keep = args.max_length - args.max_new_tokens  # prompts keep their last tokens so the total fits
    prompts = [p[-keep:] for p in batch.prompts()]
    kwargs: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.generation_temperature,
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
        "seed": derived_seed(args.seed, step, dist.get_rank(), micro),
    }
    if source == "student":
        completions = generate_completions(
            engine.module.model, prompts, synced_gpus=engine.zero_optimization_stage() == 3, **kwargs
        )
    else:
        assert isinstance(teacher, LocalTeacher)
        completions = teacher.generate(prompts, **kwargs)
    return batch.with_completions(prompts, completions, tokenizer.pad_token_id)


def _train(
    args: argparse.Namespace,
    teacher: Teacher,
    tokenizer: Any,
    rank: int,
    world: int,
    out_dir: Path,
    deepspeed: Any,
    auto_model: Any,
) -> dict[str, float]:
    is_main = rank == 0
    torch.manual_seed(args.seed)
    model = auto_model.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    student = RowLogitsLM(model)
    engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=student.parameters(), config=args.ds_config)
    device = engine.device
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    if isinstance(teacher, LocalTeacher):
        teacher.load(device, torch.bfloat16 if args.bf16 else torch.float32)

    examples = load_jsonl(args.train_file, tokenizer, args.max_length, args.max_completion_length)
    batches = ShardedBatches(examples, micro, rank, world, args.seed, tokenizer.pad_token_id)
    eval_examples = None
    if args.eval_file is not None:
        eval_examples = load_jsonl(args.eval_file, tokenizer, args.max_length, args.max_completion_length)
    start_step = 0
    if args.resume_from_checkpoint is not None:
        root, tag = resolve_resume(args.resume_from_checkpoint, out_dir)
        start_step, data_state = load_checkpoint(engine, root, tag)
        batches.load_state_dict(data_state)
    if start_step >= args.max_steps:
        raise ValueError(f"--resume_from_checkpoint is at step {start_step}, not before --max_steps {args.max_steps}")
    if is_main:
        logger.info(
            "student %s; %d ranks x micro-batch %d x accumulation %d, ZeRO stage %d, steps %d..%d",
            args.model_name_or_path,
            world,
            micro,
            gas,
            engine.zero_optimization_stage(),
            start_step + 1,
            args.max_steps,
        )

    def source_of(step: int) -> Source:
        return step_source(args.seed, step, args.lmbda, args.seq_kd)

    feed = TeacherFeed(
        iter(batches),
        teacher.request,
        depth=args.prefetch_depth,
        micro_per_step=gas,
        first_step=start_step + 1,
        ahead=lambda step: source_of(step) == "dataset",
    )
    run_log = RunLog(out_dir, is_main, args.report_to == "tensorboard", append=start_step > 0)

    def run_eval(step: int) -> dict[str, float]:
        assert eval_examples is not None
        engine.module.eval()
        metrics = sharded_eval(
            engine,
            teacher.request,
            eval_examples,
            rank=rank,
            world=world,
            batch_size=args.eval_batch_size or micro,
            pad_id=tokenizer.pad_token_id,
            top_k=args.top_k,
            args=args,
            device=device,
        )
        engine.module.train()
        run_log.write("eval", step, metrics)
        if is_main:
            logger.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    bar = tqdm(
        total=args.max_steps, initial=start_step, desc="distilling", unit="step", disable=not is_main, mininterval=1.0
    )
    started = time.perf_counter()
    window: dict[str, float] = {}
    last: dict[str, float] = {}

    def reset_window() -> None:
        window.update(loss=0.0, gkd=0.0, ce=0.0, tokens=0.0, wait=0.0, on_policy=0.0)
        window["t0"] = time.perf_counter()

    reset_window()
    try:
        for step in range(start_step + 1, args.max_steps + 1):
            source = source_of(step)
            items: list[tuple[Batch, Handle[TeacherRows] | None]] = feed.take(gas)
            if source != "dataset":
                generated = []
                for m, (batch, _) in enumerate(items):
                    new = _generated(args, source, batch, engine, teacher, tokenizer, step, m)
                    generated.append((new, teacher.request(new)))  # scored while the next one generates
                items = generated
            local_tokens = sum(b.num_target_tokens for b, _ in items)
            (global_tokens,) = all_reduce_sum([float(local_tokens)], device)
            scale = loss_scale(global_tokens, world, gas)
            with_ce = args.sft_alpha > 0 and source == "dataset"
            for batch, handle in items:
                assert handle is not None
                t_wait = time.perf_counter()
                rows = handle.result()
                window["wait"] += time.perf_counter() - t_wait
                b_idx, t_idx = row_index(batch, device)
                logits = engine(batch.input_ids.to(device), batch.attention_mask.to(device), b_idx, t_idx)
                gkd_sum = rows.gkd_loss(logits, args).sum()
                loss_sum = gkd_sum
                if with_ce:
                    labels = next_token_labels(batch.input_ids.to(device), b_idx, t_idx)
                    ce_sum = completion_cross_entropy(logits, labels).sum()
                    loss_sum = gkd_sum + args.sft_alpha * ce_sum
                    window["ce"] += float(ce_sum.detach())
                if not torch.isfinite(loss_sum):
                    raise NonFiniteLossError(f"loss is {float(loss_sum)} at step {step} (rank {rank})")
                engine.backward(loss_sum * scale)
                engine.step()
                window["loss"] += float(loss_sum.detach())
                window["gkd"] += float(gkd_sum.detach())
            window["tokens"] += global_tokens
            window["on_policy"] += source == "student"
            if step % args.logging_steps == 0 or step == args.max_steps:
                loss_all, gkd_all, ce_all = all_reduce_sum([window["loss"], window["gkd"], window["ce"]], device)
                elapsed = time.perf_counter() - window["t0"]
                record = {
                    "loss": loss_all / window["tokens"],
                    "gkd_loss": gkd_all / window["tokens"],
                    "tokens_per_s": window["tokens"] / elapsed,
                    "teacher_wait_s": window["wait"],
                    "on_policy_steps": window["on_policy"],
                    "lr": float(engine.get_lr()[0]),
                    "elapsed_s": time.perf_counter() - started,
                }
                if args.sft_alpha > 0:
                    record["sft_ce"] = ce_all / window["tokens"]
                last = record
                run_log.write("train", step, record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", wait=f"{window['wait']:.1f}s"
                )
                reset_window()
            if args.save_steps and step % args.save_steps == 0:
                save_checkpoint(engine, out_dir / CHECKPOINTS_DIR, step, feed.consumed_state)
            if eval_examples is not None and args.eval_steps and step % args.eval_steps == 0:
                last = {**last, **{f"eval_{k}": v for k, v in run_eval(step).items()}}
            bar.update(1)
        if eval_examples is not None and not (args.eval_steps and args.max_steps % args.eval_steps == 0):
            last = {**last, **{f"eval_{k}": v for k, v in run_eval(args.max_steps).items()}}
    finally:
        bar.close()
        run_log.close()

    if not args.no_export:
        export_pretrained(engine, engine.module.model, tokenizer, out_dir / "final", is_main)
    dist.barrier()
    return {**last, "wall_s": time.perf_counter() - started}


def main() -> None:
    args = parse_args()
    try:
        train(args)
    except (TeacherError, NonFiniteLossError) as exc:
        logging.getLogger("student_trainer").error("training stopped: %s", exc)
        sys.exit(2)
