"""Two-rank runs against a live teacher: distillation, YAML config, eval, TensorBoard, checkpoints, exact resume,
preemption."""

from __future__ import annotations

import itertools
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from support import REPO, failure_output, launch, load_module, read_jsonl

from demo.launch import trainer_command
from demo.tiny import TinyAssets
from teacher_service.process import TeacherProcess

pytestmark = pytest.mark.slow
STEPS = 40


@pytest.fixture(scope="module")
def full_run(tiny_assets: TinyAssets, teacher_server: TeacherProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 steps configured from YAML (command-line flags override it), checkpoint and eval every 20."""
    out = tmp_path_factory.mktemp("full")
    config = out / "run.yaml"
    config.write_text(
        f"teacher_url: {teacher_server.url}\n"
        "top_k: 16\n"
        "logging_steps: 999  # overridden on the command line\n"
        "save_steps: 20\n"
        f"eval_file: {tiny_assets.eval_file}\n"
        "eval_steps: 20\n"
        "eval_batch_size: 64\n"
        f"deepspeed: {REPO / 'deploy' / 'ds_zero2.json'}\n"
    )
    proc = launch(tiny_assets, out, "--config", str(config), "--max_steps", str(STEPS), "--logging_steps", "5")
    assert proc.returncode == 0, failure_output(proc)
    return out


def test_two_rank_distillation_against_live_teacher_lowers_loss(full_run: Path) -> None:
    log = read_jsonl(full_run / "train_log.jsonl")
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(math.isfinite(r["loss"]) for r in log)
    losses = [r["loss"] for r in log]
    # every window below the one before, and 40 steps take off more than a quarter (tiny-v2: about 40%)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.75 * losses[0], losses
    assert (full_run / "final" / "config.json").exists()


def test_eval_tensorboard_and_checkpoints(full_run: Path) -> None:
    evals = read_jsonl(full_run / "eval_log.jsonl")
    assert [e["step"] for e in evals] == [20, 40]
    assert all(math.isfinite(e["ce"]) and math.isfinite(e["kl_topk"]) for e in evals)
    assert evals[0]["tokens"] == evals[1]["tokens"] > 0  # the same held-out tokens each time
    assert evals[1]["kl_topk"] < evals[0]["kl_topk"]
    assert list((full_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (full_run / "checkpoints" / "latest").read_text().strip() == "step-40"
    assert (full_run / "checkpoints" / "step-20").is_dir()


def test_resume_continues_exactly(
    tiny_assets: TinyAssets, teacher_server: TeacherProcess, full_run: Path, tmp_path: Path
) -> None:
    """Resume at step 20 of the full run: the same losses and the same final weights as the uninterrupted run."""
    proc = launch(
        tiny_assets,
        tmp_path,
        "--teacher_url",
        teacher_server.url,
        "--top_k",
        "16",
        "--deepspeed",
        str(REPO / "deploy" / "ds_zero2.json"),
        "--max_steps",
        str(STEPS),
        "--logging_steps",
        "5",
        "--resume_from_checkpoint",
        str(full_run / "checkpoints" / "step-20"),
    )
    assert proc.returncode == 0, failure_output(proc)
    resumed = read_jsonl(tmp_path / "train_log.jsonl")
    original = {r["step"]: r for r in read_jsonl(full_run / "train_log.jsonl")}
    assert [r["step"] for r in resumed] == [25, 30, 35, 40]
    for r in resumed:
        assert r["loss"] == pytest.approx(original[r["step"]]["loss"], rel=1e-5, abs=1e-7)
    a, b = load_file(full_run / "final" / "model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)  # Adam: float rounding, ~1e-6


def test_teacher_going_down_mid_training_stops_with_a_clear_message(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    """No NaN step, no filled rows: the run logs finite losses, then stops naming the unreachable teacher."""
    with TeacherProcess(tiny_assets.teacher, log_path=tmp_path / "teacher.log") as teacher:
        cmd = trainer_command(
            tiny_assets,
            tmp_path / "run",
            "--teacher_url",
            teacher.url,
            "--top_k",
            "16",
            "--deepspeed",
            str(REPO / "deploy" / "ds_zero2.json"),
            "--max_steps",
            "100000",
            "--logging_steps",
            "1",
            "--teacher_max_retries",
            "2",
            ranks=1,
        )
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        log = tmp_path / "run" / "train_log.jsonl"
        deadline = time.monotonic() + 300
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stdout.read()[-4000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "training stopped" in output and "unreachable" in output, output[-4000:]
    losses = [r["loss"] for r in read_jsonl(log)]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses)
    assert not (tmp_path / "run" / "final").exists()


def test_preempted_run_restarts_with_the_same_command_and_ends_with_the_same_weights(
    tiny_assets: TinyAssets, tmp_path: Path
) -> None:
    """The Job's command (deploy/relay_sigterm.py + deepspeed + --resume_from_checkpoint auto), run three
    times into one output_dir: SIGTERM to the relay (as Kubernetes sends it) stops both ranks after a step
    with a checkpoint; SIGTERM to rank 1 alone does too (the ranks agree: rank 0 saves with it instead of
    waiting in the next step); the third run finishes, with the weights of an uninterrupted run.

    Its own teacher merges no requests (--max-batch-requests 1): a forward's padding depends on which
    requests share it, which moves teacher log-probs by ~1e-7, and Adam turns that into ~1e-4 in a few
    weights; a restart changes the timing of the requests, hence the merges."""
    relay = load_module(REPO / "deploy" / "relay_sigterm.py")
    steps = 16
    launched: list[subprocess.Popen[bytes]] = []

    def start(teacher: TeacherProcess, out: Path, log: Path, relayed: bool = True) -> subprocess.Popen[bytes]:
        flags = ["--teacher_url", teacher.url, "--top_k", "16", "--deepspeed", str(REPO / "deploy/ds_zero2.json"),
                 "--max_steps", str(steps), "--logging_steps", "1", "--resume_from_checkpoint", "auto"]  # fmt: skip
        # the same command each time but for the rendezvous port, free now (tests run side by side)
        cmd = trainer_command(tiny_assets, out, *flags)
        if relayed:
            cmd = [sys.executable, str(REPO / "deploy" / "relay_sigterm.py"), *cmd]
        launched.append(subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO))
        return launched[-1]

    out = tmp_path / "run"

    def steps_logged() -> list[int]:
        log = out / "train_log.jsonl"
        return [r["step"] for r in read_jsonl(log)] if log.exists() else []

    def stop_after(proc: subprocess.Popen[bytes], log: Path, first: int, signal_to: Callable[[], None]) -> int:
        """Signal once step ``first`` is logged; the step of the checkpoint the run stopped with."""
        deadline = time.monotonic() + 300
        while first not in steps_logged():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        signal_to()
        assert proc.wait(timeout=300) == 143, log.read_text()[-4000:]  # preempted: not a completed run
        stopped = steps_logged()[-1]  # the interrupted log window is written too
        assert first <= stopped < steps
        assert (out / "checkpoints" / f"step-{stopped}" / "gkd_manifest.json").is_file()  # complete
        assert not (out / "final").exists()
        return stopped

    try:
        with TeacherProcess(
            tiny_assets.teacher, extra_args=["--max-top-k", "16", "--max-batch-requests", "1"],
            log_path=tmp_path / "teacher.log",
        ) as teacher:  # fmt: skip
            reference = start(teacher, tmp_path / "uninterrupted", tmp_path / "0.log", relayed=False)
            assert reference.wait(timeout=600) == 0, (tmp_path / "0.log").read_text()[-4000:]

            first = start(teacher, out, tmp_path / "1.log")
            stopped = stop_after(first, tmp_path / "1.log", 2, lambda: first.send_signal(signal.SIGTERM))
            output = (tmp_path / "1.log").read_text()
            assert "no complete checkpoint" in output and "starting fresh" in output
            assert "SIGTERM relayed to the training ranks" in output

            def rank_1_only() -> None:
                (rank_1,) = [p for p in relay.training_ranks(second.pid) if "--local_rank=1" in p.cmdline()]
                rank_1.send_signal(signal.SIGTERM)

            second = start(teacher, out, tmp_path / "2.log")
            stopped_again = stop_after(second, tmp_path / "2.log", stopped + 2, rank_1_only)
            assert f"resumed from {out / 'checkpoints' / f'step-{stopped}'}" in (tmp_path / "2.log").read_text()

            third = start(teacher, out, tmp_path / "3.log")
            assert third.wait(timeout=600) == 0, (tmp_path / "3.log").read_text()[-4000:]
            assert f"step-{stopped_again} at step {stopped_again}" in (tmp_path / "3.log").read_text()
    finally:  # a failed assertion leaves no launcher or rank behind (the relay runs them in their own group)
        for proc in launched:
            if proc.poll() is None:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
    a = load_file(tmp_path / "uninterrupted" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)  # as test_resume_continues_exactly
