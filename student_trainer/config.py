"""Trainer flags (HF/TRL-style names), each default with its reason, and checks that fail before training."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

DEFAULT_TEACHER_URL = "http://127.0.0.1:8000"
"""The teacher service's default address (vLLM's default port, so `vllm serve` defaults line up too)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="student_trainer",
        description="Distill a student from a teacher service with the GKD loss over top-k log-probs "
        "(launch with `deepspeed --num_gpus N -m student_trainer ...`).",
    )
    p.add_argument("--model_name_or_path", required=True, help="student model directory (Hugging Face layout)")
    p.add_argument("--train_file", required=True, help="JSONL with 'prompt' and 'completion' fields")
    p.add_argument("--output_dir", required=True, help="logs, checkpoints and the final export go here")
    p.add_argument(
        "--teacher_url",
        default=os.environ.get("TEACHER_URL", DEFAULT_TEACHER_URL),
        help=f"teacher service base URL (env TEACHER_URL; default {DEFAULT_TEACHER_URL})",
    )
    p.add_argument(
        "--teacher_api_key_env",
        default="TEACHER_API_KEY",
        help="name of the environment variable holding the teacher's API key, if any",
    )
    p.add_argument("--teacher_timeout", type=float, default=120.0, help="seconds per teacher request")
    p.add_argument(
        "--prefetch_depth",
        type=int,
        default=2,
        help="teacher requests in flight ahead of the step being trained (>= 1)",
    )
    p.add_argument("--max_steps", type=int, required=True, help="optimizer steps to train")
    p.add_argument("--top_k", type=int, default=20, help="teacher log-probs per position (vLLM's default max is 20)")
    p.add_argument(
        "--beta",
        type=float,
        default=0.5,
        help="generalized JSD interpolation: 0 = forward KL(teacher||student), 1 = reverse KL (TRL's default 0.5)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="softmax temperature on both sides; 1 keeps the teacher's raw log-probs exact",
    )
    p.add_argument(
        "--tail",
        choices=["renorm", "tail"],
        default="tail",
        help="mass outside the top-k: one extra 'tail' class (default; needs --temperature 1) "
        "or renormalize over the top-k",
    )
    p.add_argument("--max_length", type=int, default=1024, help="prompt + completion tokens (the total)")
    p.add_argument(
        "--max_completion_length",
        type=int,
        default=None,
        help="completion tokens kept (must leave room for the prompt inside --max_length)",
    )
    p.add_argument("--seed", type=int, default=42, help="data order and initialization seed")
    p.add_argument("--logging_steps", type=int, default=10, help="log (rank 0) every N optimizer steps")
    p.add_argument("--no_export", action="store_true", help="skip the final save_pretrained export")
    p.add_argument(
        "--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)), help="set by the deepspeed launcher"
    )
    p.add_argument(
        "--deepspeed",
        "--deepspeed_config",
        dest="deepspeed_config",
        required=True,
        help="DeepSpeed JSON config (batch sizes, optimizer, ZeRO stage); see deploy/ds_zero*.json",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.beta <= 1.0:
        parser.error(f"--beta must be in [0, 1], got {args.beta}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.tail == "tail" and args.temperature != 1.0:
        parser.error(
            "--tail tail needs --temperature 1 (the teacher's tail mass is known at temperature 1 only); "
            "use --tail renorm with other temperatures"
        )
    if args.top_k < 1:
        parser.error(f"--top_k must be >= 1, got {args.top_k}")
    if args.prefetch_depth < 1:
        parser.error(f"--prefetch_depth must be >= 1, got {args.prefetch_depth}")
    if args.max_steps < 1:
        parser.error(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.max_completion_length is not None and args.max_completion_length >= args.max_length:
        parser.error(
            f"--max_completion_length {args.max_completion_length} leaves no room for the prompt inside "
            f"--max_length {args.max_length} (the total)"
        )
    return args
