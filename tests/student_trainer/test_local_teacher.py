"""In-process teacher: sequence-level KD mixed with on-policy steps, and a refused tokenizer end to end."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, failure_output, launch, read_jsonl
from transformers import AutoTokenizer

from demo.tiny import TinyAssets
from student_trainer.schedule import step_source
from teacher_service.process import free_port

pytestmark = pytest.mark.slow


def test_seq_kd_and_on_policy_steps_follow_the_schedule(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    proc = launch(
        tiny_assets,
        tmp_path,
        "--teacher_model_name_or_path",
        str(tiny_assets.teacher),
        "--deepspeed",
        str(REPO / "deploy" / "ds_zero0.json"),
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--lmbda",
        "0.5",
        "--seq_kd",
        "--max_new_tokens",
        "8",
        "--sft_alpha",
        "0.3",
    )
    assert proc.returncode == 0, failure_output(proc)
    log = read_jsonl(tmp_path / "train_log.jsonl")
    expected = [step_source(42, step, 0.5, True) for step in range(1, 7)]
    assert {"student", "teacher"} <= set(expected)  # this seed exercises both sources
    assert [r["on_policy_steps"] for r in log] == [float(s == "student") for s in expected]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert all(r["sft_ce"] == 0 for r in log)  # the SFT term applies to dataset completions only


def test_teacher_with_another_tokenizer_is_refused_before_training(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets.teacher, teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(teacher)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    cmd = [sys.executable, "-m", "student_trainer", "--model_name_or_path", str(tiny_assets.student)]
    cmd += ["--train_file", str(tiny_assets.train_file), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"]
    cmd += ["--teacher_model_name_or_path", str(teacher), "--deepspeed", str(REPO / "deploy" / "ds_zero0.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode != 0, failure_output(proc)
    output = proc.stdout + proc.stderr
    assert "training stopped: tokenizer mismatch" in output, output[-3000:]
    assert output.count("sha256:") >= 2
    assert not (tmp_path / "run" / "train_log.jsonl").exists()
