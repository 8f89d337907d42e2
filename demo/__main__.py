"""`make demo`: build tiny models, serve the teacher, distill the student with DeepSpeed, report."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.launch import trainer_command
from demo.tiny import build_assets
from student_trainer.data import load_jsonl
from student_trainer.evaluate import EvalResult, evaluate, row_logits_fn
from teacher_service.process import TeacherProcess

logger = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parent.parent


def held_out(student_dir: Path, teacher_dir: Path, eval_file: Path, top_k: int) -> tuple[EvalResult, EvalResult]:
    """(student metrics, teacher metrics) on the held-out set, computed in-process."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    examples = load_jsonl(eval_file, tokenizer, max_length=256)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    t_fn, s_fn = row_logits_fn(teacher), row_logits_fn(student)
    s_res = evaluate(s_fn, t_fn, examples, tokenizer.pad_token_id, top_k)
    t_res = evaluate(t_fn, None, examples, tokenizer.pad_token_id, top_k)
    return s_res, t_res


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    p.add_argument("--cache", type=Path, default=Path("runs/cache"), help="tiny model cache (default: runs/cache)")
    p.add_argument("--steps", type=int, default=300, help="distillation steps (default: 300)")
    p.add_argument("--top-k", type=int, default=16, help="teacher log-probs per position (default: 16)")
    p.add_argument(
        "--tail", choices=["renorm", "tail"], default="tail", help="mass outside the top-k in the loss (default: tail)"
    )
    p.add_argument("--num-gpus", type=int, default=2, help="DeepSpeed ranks (CPU processes here; default: 2)")
    p.add_argument("--deepspeed", type=Path, default=ROOT / "deploy" / "ds_zero2.json", help="DeepSpeed config")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()

    assets = build_assets(args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    logger.info("evaluating teacher and untrained student on %s", assets.chat_eval_file)
    before, teacher_res = held_out(assets.student, assets.teacher, assets.chat_eval_file, args.top_k)

    train_dir = args.out / "train"
    shutil.rmtree(train_dir, ignore_errors=True)
    with TeacherProcess(assets.teacher, log_path=args.out / "teacher.log") as teacher:
        cmd = trainer_command(
            assets, train_dir, "--teacher_url", teacher.url, "--max_steps", str(args.steps),
            "--top_k", str(args.top_k), "--beta", "0.0", "--tail", args.tail,
            "--deepspeed", str(args.deepspeed), "--logging_steps", "25", ranks=args.num_gpus,
            dataset=assets.chat_train_file,
        )  # fmt: skip
        logger.info("launching: %s", " ".join(cmd))
        t_train = time.perf_counter()
        subprocess.run(cmd, check=True)
        train_s = time.perf_counter() - t_train

    after, _ = held_out(train_dir / "final", assets.teacher, assets.chat_eval_file, args.top_k)
    summary = {
        "teacher_ce": teacher_res.ce,
        "student_ce_before": before.ce,
        "student_ce_after": after.ce,
        "kl_before": before.kl,
        "kl_after": after.kl,
        "kl_ratio": after.kl / before.kl,
        "eval_tokens": before.tokens,
        "steps": args.steps,
        "top_k": args.top_k,
        "ranks": args.num_gpus,
        "train_s": train_s,
        "wall_s": time.perf_counter() - started,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'held-out (assistant tokens)':<30}{'before':>10}{'after':>10}")
    print(f"{'student cross-entropy':<30}{before.ce:>10.3f}{after.ce:>10.3f}")
    print(f"{'KL(teacher||student), top-k':<30}{before.kl:>10.3f}{after.kl:>10.3f}")
    print(f"{'teacher cross-entropy':<30}{teacher_res.ce:>10.3f}{teacher_res.ce:>10.3f}")
    print(
        f"\n{args.steps} steps on {args.num_gpus} DeepSpeed ranks in {train_s:.0f}s; "
        f"total {summary['wall_s']:.0f}s. Summary: {args.out / 'summary.json'}"
    )
    if not after.kl <= 0.5 * before.kl:
        sys.exit(f"demo: distillation did not transfer: kl_after {after.kl:.3f} > kl_before/2 {before.kl / 2:.3f}")


if __name__ == "__main__":
    main()
