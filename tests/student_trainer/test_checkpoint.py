"""Checkpoint manifests, `--resume_from_checkpoint auto`, and the SIGTERM flag, in one gloo process (the
two-rank launches with a real SIGTERM are in test_train_deepspeed.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from student_trainer.checkpoint import MANIFEST, incomplete, latest_complete, resume_point, save_checkpoint
from student_trainer.config import parse_args
from student_trainer.preemption import StopSignal
from teacher_service.process import free_port


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class FilesEngine:
    """What save_checkpoint needs of a DeepSpeed engine: files under root/tag, and ``latest``."""

    module = torch.nn.Linear(2, 2)  # all trainable: a full (not LoRA) checkpoint

    def save_checkpoint(
        self, root: str, tag: str, client_state: dict[str, Any], exclude_frozen_parameters: bool = False
    ) -> None:
        assert not exclude_frozen_parameters
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(client_state, Path(root) / tag / "mp_rank_00_model_states.pt")
        (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
        (Path(root) / "latest").write_text(tag)


def test_auto_takes_the_newest_complete_checkpoint(
    one_rank: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "checkpoints"
    assert latest_complete(tmp_path) is None and resume_point("auto", tmp_path) is None  # a fresh start
    for step in (3, 12, 20):
        save_checkpoint(FilesEngine(), root, step, {"epoch": 0, "batch": step})
    manifest = json.loads((root / "step-20" / MANIFEST).read_text())
    assert manifest["step"] == 20 and manifest["world_size"] == 1
    assert manifest["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"] == 100
    assert resume_point("auto", tmp_path) == (root, "step-20")

    # killed in the middle of saving step 20: an optimizer shard cut short; step 30: no manifest yet
    (root / "step-20" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    (root / "step-30").mkdir()
    (root / "step-30" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (root / "latest").write_text("step-30")  # DeepSpeed's `latest` is no proof of a complete save
    assert "the manifest says 100" in (incomplete(root / "step-20") or "")
    with caplog.at_level(logging.WARNING):
        assert resume_point("auto", tmp_path) == (root, "step-12")  # 12 > 3: by number, not by name
    assert "step-30: no gkd_manifest.json" in caplog.text and "step-20: zero_pp_rank_0" in caplog.text
    (root / "step-12" / MANIFEST).write_text("{not json")
    assert "unreadable" in (incomplete(root / "step-12") or "")
    assert resume_point("auto", tmp_path) == (root, "step-3")


def test_auto_is_accepted_with_nothing_to_resume(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    args = parse_args(["--model_name_or_path", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.jsonl"),
                       "--output_dir", str(tmp_path / "out"), "--max_steps", "10", "--deepspeed",
                       str(Path(__file__).resolve().parents[2] / "deploy" / "ds_zero2.json"),
                       "--resume_from_checkpoint", "auto"])  # fmt: skip
    assert args.resume_from_checkpoint == "auto"


def test_sigterm_sets_the_flag_that_the_ranks_agree_on(one_rank: None) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = StopSignal()
        assert not stop.requested and not stop.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode: the process lives
        assert stop.requested and stop.received == "SIGTERM"
        assert stop.agreed(torch.device("cpu"))
    finally:
        signal.signal(signal.SIGTERM, previous)
