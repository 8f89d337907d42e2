"""Trainer flags (HF/TRL-style names), each default with its reason, and checks that fail before training.

Flags may also come from ``--config file.yaml`` whose keys are the flag names (``top_k: 32``);
flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from student_trainer.checkpoint import resolve_resume
from student_trainer.ds_config import DeepSpeedConfigError, load_deepspeed_config

DEFAULT_TEACHER_URL = "http://127.0.0.1:8000"
"""The teacher service's default address (vLLM's default port, so `vllm serve` defaults line up too)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="student_trainer",
        description="Distill a student from a teacher with the GKD loss over top-k log-probs "
        "(launch with `deepspeed --num_gpus N --module student_trainer ...`).",
    )
    p.add_argument("--config", help="YAML file whose keys are these flag names; command-line flags override it")
    g = p.add_argument_group("model and data")
    g.add_argument("--model_name_or_path", required=True, help="student model directory (Hugging Face layout)")
    g.add_argument("--train_file", required=True, help="JSONL with 'prompt' and 'completion' fields")
    g.add_argument("--output_dir", required=True, help="logs, checkpoints and the final export go here")
    g.add_argument("--max_length", type=int, default=1024, help="prompt + completion tokens (the total)")
    g.add_argument(
        "--max_completion_length",
        type=int,
        default=None,
        help="completion tokens kept (must leave room for the prompt inside --max_length)",
    )
    g.add_argument("--seed", type=int, default=42, help="data order, initialization and the lmbda draws")

    g = p.add_argument_group("teacher")
    g.add_argument(
        "--teacher_url",
        default=None,
        help=f"teacher service base URL (default: $TEACHER_URL or {DEFAULT_TEACHER_URL})",
    )
    g.add_argument(
        "--teacher_api",
        choices=["gkd", "vllm"],
        default="gkd",
        help="gkd: this project's /v1/topk_logprobs (binary frames); vllm: any /v1/completions server "
        "with prompt_logprobs (stock `vllm serve`, whose --max-logprobs defaults to 20)",
    )
    g.add_argument(
        "--teacher_model_name_or_path",
        default=None,
        help="in-process transformers teacher instead of a service: full-vocabulary loss, teacher forward "
        "on every rank (comparison runs, small teachers); also what --seq_kd needs",
    )
    g.add_argument(
        "--teacher_api_key_env",
        default="TEACHER_API_KEY",
        help="name of the environment variable holding the teacher's API key, if any",
    )
    g.add_argument("--teacher_timeout", type=float, default=120.0, help="seconds per teacher request")
    g.add_argument(
        "--teacher_max_retries",
        type=int,
        default=5,
        help="retries of a transient teacher failure (connection, 429, 502-504) before training stops",
    )
    g.add_argument(
        "--prefetch_depth",
        type=int,
        default=2,
        help="teacher requests in flight ahead of the micro-batch being trained; 0 = fetch when needed",
    )
    g.add_argument("--top_k", type=int, default=20, help="teacher log-probs per position (vLLM's default max is 20)")

    g = p.add_argument_group("loss")
    g.add_argument(
        "--beta",
        type=float,
        default=0.5,
        help="generalized JSD interpolation: 0 = forward KL(teacher||student), 1 = reverse KL (TRL's default 0.5)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="softmax temperature on both sides; 1 keeps the teacher's raw log-probs exact",
    )
    g.add_argument(
        "--tail",
        choices=["renorm", "tail"],
        default="tail",
        help="mass outside the top-k: one extra 'tail' class (default; needs --temperature 1) "
        "or renormalize over the top-k",
    )
    g.add_argument(
        "--sft_alpha",
        type=float,
        default=0.0,
        help="weight of the cross-entropy on dataset completions added to the GKD loss (same token mean)",
    )

    g = p.add_argument_group("GKD schedule and generation")
    g.add_argument(
        "--lmbda",
        type=float,
        default=0.0,
        help="probability that a step trains on student-generated completions (on-policy); "
        "drawn from --seed and the step number, so every rank agrees",
    )
    g.add_argument(
        "--seq_kd",
        action="store_true",
        help="off-policy steps train on teacher-generated completions (needs --teacher_model_name_or_path)",
    )
    g.add_argument(
        "--max_new_tokens", type=int, default=None, help="tokens generated per completion (needed for lmbda/seq_kd)"
    )
    g.add_argument(
        "--generation_temperature",
        type=float,
        default=1.0,
        help="sampling temperature of generated completions; 0 = greedy",
    )

    g = p.add_argument_group("schedule, checkpoints, evaluation")
    g.add_argument("--max_steps", type=int, required=True, help="optimizer steps to train")
    g.add_argument("--logging_steps", type=int, default=10, help="log (rank 0) every N optimizer steps")
    g.add_argument("--save_steps", type=int, default=None, help="DeepSpeed checkpoint every N steps (off if unset)")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint directory (output_dir/checkpoints/step-N), a checkpoints root with a `latest` file, "
        "or `latest` (output_dir/checkpoints)",
    )
    g.add_argument("--eval_file", default=None, help="held-out JSONL (prompt/completion) for KL and cross-entropy")
    g.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (and at the end)")
    g.add_argument(
        "--eval_batch_size", type=int, default=None, help="sequences per evaluation batch (default: micro-batch)"
    )
    g.add_argument(
        "--report_to",
        choices=["tensorboard", "none"],
        default="tensorboard",
        help="TensorBoard event files in output_dir/tensorboard (rank 0); JSONL logs are always written",
    )
    g.add_argument("--no_export", action="store_true", help="skip the final save_pretrained export")

    g = p.add_argument_group("DeepSpeed")
    g.add_argument(
        "--deepspeed",
        "--deepspeed_config",
        dest="deepspeed_config",
        required=True,
        help="DeepSpeed JSON config (batch sizes, optimizer, ZeRO stage); see deploy/ds_zero*.json",
    )
    g.add_argument(
        "--bf16",
        action="store_true",
        help="enable the config's bf16 section (refused where the hardware has no bf16)",
    )
    g.add_argument(
        "--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)), help="set by the deepspeed launcher"
    )
    return p


def _config_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A YAML file turned into command-line tokens, so types and choices are checked as for flags."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config {path}: {exc}")
    if data is None:
        return []
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    argv: list[str] = []
    for key, value in data.items():
        flag = f"--{key}"
        action = parser._option_string_actions.get(flag)
        if action is None or key in ("config", "local_rank"):
            parser.error(f"--config {path}: unknown key {key!r} (keys are flag names, e.g. top_k)")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} must be true or false")
            argv += [flag] if value else []
        elif value is not None:
            if isinstance(value, (list, dict)):
                parser.error(f"--config {path}: {key} must be a single value")
            argv += [flag, str(value)]
    return argv


def parse_args(argv: Sequence[str] | None = None, check_files: bool = True) -> argparse.Namespace:
    """Flags (and ``--config`` YAML) checked for consistency; ``check_files=False`` skips what needs the
    filesystem (inputs existing, the DeepSpeed config's contents), e.g. to check a container's command."""
    parser = build_parser()
    tokens = list(argv) if argv is not None else sys.argv[1:]
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config")
    config_path = config_only.parse_known_args(tokens)[0].config
    if config_path:
        tokens = _config_argv(parser, config_path) + tokens  # later tokens win: the command line overrides
    args = parser.parse_args(tokens)
    check_args(parser, args)
    if check_files:
        check_files_exist(parser, args)
    return args


def _is_hub_id(value: str) -> bool:
    """``org/name`` or ``name``: what ``from_pretrained`` resolves on the Hugging Face Hub when no such path exists."""
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value) is not None and not value.startswith(".")


def check_files_exist(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Inputs exist (models may also be hub ids), the resume point is found, the DeepSpeed config is valid."""
    fail = parser.error
    for name in ("model_name_or_path", "teacher_model_name_or_path", "train_file", "eval_file"):
        value = getattr(args, name)
        if value is None or Path(value).exists():
            continue
        if name.endswith("model_name_or_path") and _is_hub_id(value):
            continue
        fail(f"--{name} {value} does not exist")
    if args.resume_from_checkpoint is not None:
        try:
            resolve_resume(args.resume_from_checkpoint, args.output_dir)
        except FileNotFoundError as exc:
            fail(f"--resume_from_checkpoint: {exc}")
    try:
        args.ds_config = load_deepspeed_config(args.deepspeed_config, bf16=args.bf16)
    except DeepSpeedConfigError as exc:
        fail(str(exc))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Incompatible combinations fail here, before any model loads, naming the flags."""
    fail = parser.error
    if not 0.0 <= args.beta <= 1.0:
        fail(f"--beta must be in [0, 1], got {args.beta}")
    if args.temperature <= 0:
        fail(f"--temperature must be > 0, got {args.temperature}")
    local_teacher = args.teacher_model_name_or_path is not None
    if local_teacher and args.teacher_url is not None:
        fail("--teacher_url and --teacher_model_name_or_path are alternatives; give one")
    if local_teacher and args.teacher_api != "gkd":
        fail("--teacher_api applies to a teacher service, not to --teacher_model_name_or_path")
    if not local_teacher and args.teacher_url is None:
        args.teacher_url = os.environ.get("TEACHER_URL", DEFAULT_TEACHER_URL)
    if not local_teacher and args.tail == "tail" and args.temperature != 1.0:
        fail(
            "--tail tail needs --temperature 1 (the teacher's tail mass is known at temperature 1 only); "
            "use --tail renorm with other temperatures"
        )
    if args.top_k < 1:
        fail(f"--top_k must be >= 1, got {args.top_k}")
    if args.prefetch_depth < 0:
        fail(f"--prefetch_depth must be >= 0, got {args.prefetch_depth}")
    if args.teacher_max_retries < 0:
        fail(f"--teacher_max_retries must be >= 0, got {args.teacher_max_retries}")
    for name in ("max_steps", "logging_steps", "save_steps", "eval_steps", "eval_batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name} must be >= 1, got {value}")
    if args.max_completion_length is not None and args.max_completion_length < 1:
        fail(f"--max_completion_length must be >= 1, got {args.max_completion_length}")
    if args.max_completion_length is not None and args.max_completion_length >= args.max_length:
        fail(
            f"--max_completion_length {args.max_completion_length} leaves no room for the prompt inside "
            f"--max_length {args.max_length} (the total)"
        )
    if args.sft_alpha < 0:
        fail(f"--sft_alpha must be >= 0, got {args.sft_alpha}")
    if not 0.0 <= args.lmbda <= 1.0:
        fail(f"--lmbda must be in [0, 1], got {args.lmbda}")
    if args.generation_temperature < 0:
        fail(f"--generation_temperature must be >= 0, got {args.generation_temperature}")
    if args.seq_kd and not local_teacher:
        fail(
            "--seq_kd needs a teacher that generates: the teacher service has no generation endpoint; "
            "use --teacher_model_name_or_path DIR (in-process teacher)"
        )
    generates = args.lmbda > 0 or args.seq_kd
    if generates and args.max_new_tokens is None:
        fail(
            f"--lmbda {args.lmbda}{' with --seq_kd' if args.seq_kd else ''} generates completions: "
            "set --max_new_tokens (and optionally --generation_temperature)"
        )
    if generates and args.max_new_tokens >= args.max_length:
        fail(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt inside --max_length")
    if args.eval_steps is not None and args.eval_file is None:
        fail("--eval_steps needs --eval_file")


def describe(args: argparse.Namespace) -> dict[str, object]:
    """The resolved flags, for the run's log (the parsed DeepSpeed config is logged by DeepSpeed)."""
    return {k: v for k, v in vars(args).items() if k != "ds_config"}
