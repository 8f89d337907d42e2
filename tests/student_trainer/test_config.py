"""Flags, the YAML config file, and the combinations refused before training (each message names its flags)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from support import REPO

from student_trainer.checkpoint import resolve_resume
from student_trainer.config import FLAG_GROUPS, TrainerConfig, parse_args
from student_trainer.ds_config import DeepSpeedConfigError, bf16_available, load_deepspeed_config
from student_trainer.loss import LossConfig


@pytest.fixture
def base(tmp_path: Path) -> list[str]:
    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return [
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--train_file",
        str(tmp_path / "train.jsonl"),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "10",
        "--deepspeed",
        str(REPO / "deploy" / "ds_zero2.json"),
    ]


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_yaml_keys_are_flag_names_and_the_command_line_wins(base: list[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("top_k: 32\nbeta: 0.0\nseq_kd: false\nno_export: true\nlogging_steps: 7\ntail: renorm\n")
    args = parse_args(["--config", str(config), *base, "--logging_steps", "3"])
    assert (args.top_k, args.beta, args.no_export, args.logging_steps, args.tail) == (32, 0.0, True, 3, "renorm")
    assert args.ds_config["zero_optimization"]["stage"] == 2


def test_yaml_can_hold_the_required_flags_too(base: list[str], tmp_path: Path) -> None:
    pairs = dict(zip(base[::2], base[1::2], strict=True))
    config = tmp_path / "all.yaml"
    config.write_text("".join(f"{k.lstrip('-')}: {v}\n" for k, v in pairs.items()))
    assert parse_args(["--config", str(config)]).max_steps == 10


def test_yaml_errors_name_the_key(base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("topk: 3\n")
    assert "unknown key 'topk'" in refused(["--config", str(config), *base], capsys)
    config.write_text("top_k: many\n")
    assert "--top_k" in refused(["--config", str(config), *base], capsys)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--lmbda", "0.5"], "--lmbda 0.5 generates completions: set --max_new_tokens"),
        (["--seq_kd"], "--lmbda 0.0 with --seq_kd generates completions: set --max_new_tokens"),
        (
            ["--tail", "tail", "--temperature", "0.5", "--teacher_api", "vllm"],
            "--tail tail at --temperature != 1 needs the teacher's rows at that temperature",
        ),
        (
            ["--tail", "tail", "--temperature", "0.5", "--teacher_cache", "cache"],
            "--teacher_cache holds raw (temperature 1) rows",
        ),
        (
            ["--tail", "tail", "--temperature", "0.5", "--sft_alpha", "0.1"],
            "--fused_loss takes --sft_alpha with --tail tail at --temperature 1 only",
        ),
        (["--max_completion_length", "64", "--max_length", "64"], "--max_completion_length 64 leaves no room"),
        (["--max_completion_length", "0"], "--max_completion_length must be >= 1"),
        (["--lmbda", "1", "--max_new_tokens", "64", "--max_length", "64"], "--max_new_tokens 64 leaves no room"),
        (["--resume_from_checkpoint", "latest"], "--resume_from_checkpoint: no checkpoint to resume"),
        (
            ["--resume_from_checkpoint", "/nonexistent/ckpt"],
            "--resume_from_checkpoint: /nonexistent/ckpt does not exist",
        ),
        (["--eval_steps", "5"], "--eval_steps needs --eval_file"),
        (["--lmbda", "1.5"], "--lmbda must be in [0, 1]"),
        (["--prefetch_depth", "-1"], "--prefetch_depth must be >= 0"),
        (["--teacher_model_name_or_path", "/nonexistent"], "--teacher_model_name_or_path /nonexistent does not exist"),
    ],
)
def test_incompatible_flags_fail_before_training(
    base: list[str], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in refused([*base, *extra], capsys)


def test_local_teacher_excludes_teacher_url(
    base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*base, "--teacher_model_name_or_path", str(tmp_path / "model"), "--teacher_url", "http://x"]
    assert "--teacher_url and --teacher_model_name_or_path are alternatives" in refused(argv, capsys)
    args = parse_args([*base, "--teacher_model_name_or_path", str(tmp_path / "model"), "--temperature", "0.5"])
    assert args.teacher_url is None  # full-vocabulary loss: --tail does not apply, any temperature works


def test_deepspeed_configs_in_deploy_are_explicit_and_bf16_is_refused_without_hardware(tmp_path: Path) -> None:
    for stage in (0, 2, 3):
        config = load_deepspeed_config(REPO / "deploy" / f"ds_zero{stage}.json")
        assert config["zero_optimization"]["stage"] == stage and config["bf16"] == {"enabled": False}
    if not bf16_available():
        with pytest.raises(DeepSpeedConfigError, match="--bf16: this machine has no GPU with bf16"):
            load_deepspeed_config(REPO / "deploy" / "ds_zero2.json", bf16=True)
    else:
        assert load_deepspeed_config(REPO / "deploy" / "ds_zero2.json", bf16=True)["bf16"]["enabled"] is True
    auto = tmp_path / "auto.json"
    auto.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "optimizer": {"params": {"lr": "auto"}}}))
    with pytest.raises(DeepSpeedConfigError, match=r"\['train_micro_batch_size_per_gpu', 'optimizer.params.lr'\]"):
        load_deepspeed_config(auto)


def test_resume_spec_resolution(tmp_path: Path) -> None:
    root = tmp_path / "out" / "checkpoints"
    (root / "step-4").mkdir(parents=True)
    (root / "latest").write_text("step-4")
    assert resolve_resume("latest", tmp_path / "out") == (root, "step-4")
    assert resolve_resume(str(root), "unused") == (root, "step-4")
    assert resolve_resume(str(root / "step-4"), "unused") == (root, "step-4")


def test_every_field_has_one_place_in_the_flag_groups() -> None:
    fields = [f.name for f in dataclasses.fields(TrainerConfig) if f.init]
    grouped = [name for names in FLAG_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(fields)


def test_models_may_be_hub_ids_but_local_paths_must_exist(
    base: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse_args([*base, "--teacher_model_name_or_path", "Qwen/Qwen3-0.6B"])
    assert args.teacher_model_name_or_path == "Qwen/Qwen3-0.6B"
    assert "--teacher_model_name_or_path ./missing does not exist" in refused(
        [*base, "--teacher_model_name_or_path", "./missing"], capsys
    )
    missing_data = [*base, "--train_file", str(tmp_path / "none.jsonl")]
    assert "--train_file" in refused(missing_data, capsys)
    assert parse_args(missing_data, check_files=False).train_file.endswith("none.jsonl")


def test_the_config_checks_itself_when_built_in_code(tmp_path: Path) -> None:
    """The same checks guard a TrainerConfig built in Python (a notebook, a launcher) as on the command line."""
    required = {
        "model_name_or_path": "m",
        "dataset": "t.jsonl",
        "output_dir": str(tmp_path),
        "max_steps": 5,
        "deepspeed_config": "ds.json",
    }
    config = TrainerConfig(**required, beta=0.25, tail="renorm", temperature=2.0)
    assert config.loss == LossConfig(beta=0.25, temperature=2.0, tail="renorm")
    assert config.teacher_url is not None  # the default teacher is filled in
    with pytest.raises(ValueError, match="--tail must be one of 'renorm', 'tail', got 'bogus'"):
        TrainerConfig(**required, tail="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"--beta must be in \[0, 1\]"):
        TrainerConfig(**required, beta=2.0)
