"""The trainer launched the way DeepSpeed users launch it: `deepspeed --num_gpus 2 --module student_trainer`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from demo.tiny import TinyAssets
from teacher_service.process import TeacherProcess, free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def launch(
    assets: TinyAssets, out: Path, teacher_url: str, steps: int, *extra: str, ranks: int = 2, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher, "the deepspeed launcher must be installed beside this Python"
    cmd = [
        launcher,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "--module",
        "student_trainer",
        "--model_name_or_path",
        str(assets.student),
        "--train_file",
        str(assets.train_file),
        "--output_dir",
        str(out),
        "--teacher_url",
        teacher_url,
        "--max_steps",
        str(steps),
        "--top_k",
        "16",
        "--deepspeed",
        str(REPO / "deploy" / "ds_zero2.json"),
        "--logging_steps",
        "5",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_two_rank_distillation_against_live_teacher_lowers_loss(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path: Path
) -> None:
    proc = launch(tiny_assets, tmp_path, teacher_server.url, 40)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(r["loss"] == r["loss"] for r in log)  # no NaN
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert (tmp_path / "final" / "config.json").exists()


def test_unreachable_teacher_stops_training_with_a_clear_message(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    proc = launch(tiny_assets, tmp_path, f"http://127.0.0.1:{free_port()}", 5, ranks=1, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "training stopped" in output and "unreachable" in output
    assert not (tmp_path / "final").exists()
