"""A training run through failures: a whole-teacher restart, a replica loss, a trainer preemption and resume.

Two replicas of the tiny teacher (real ``python -m teacher_service`` processes) serve a two-rank DeepSpeed
run (``--teacher_url`` lists both, ``--logging_steps 1``, ``--save_steps``). The same run is made twice:

- undisturbed: the baseline;
- disturbed: at ``--outage-step`` both replicas are SIGKILLed and restarted on their ports ``--pause`` s later
  (the trainer waits on its step); at ``--replica-loss-step`` replica 2 is SIGKILLed for good (replica 1 takes
  its load); at ``--preempt-step`` the pod's command (the launcher under ``deploy/relay_sigterm.py``, as the
  Kubernetes Job runs it) gets SIGTERM and, ``--grace`` seconds later, its whole session
  SIGKILL (as the kubelet evicts a pod), and the same command is started again with ``--resume_from_checkpoint``
  (``auto`` where the trainer has it, else ``latest``).

Reported: lost steps (steps trained twice because the preemption lost them; goal 0), steps missing from the
log (must be 0), the wall time against the baseline (with the deliberate outage pause also subtracted), and the
largest difference of the final weights from the baseline's.

    python -m bench.chaos --steps 150
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bench.common import machine
from demo.launch import trainer_command
from demo.tiny import TinyAssets, build_assets
from student_trainer.config import TrainerConfig
from teacher_service.process import TeacherProcess

logger = logging.getLogger("bench.chaos")
REPO = Path(__file__).resolve().parents[1]


def _log_steps(out: Path) -> list[int]:
    path = out / "train_log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _wait_step(proc: subprocess.Popen[bytes], out: Path, step: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while max(_log_steps(out), default=0) < step:
        if proc.poll() is not None:
            raise RuntimeError(f"trainer exited with {proc.returncode} before step {step}; see {out}/trainer.log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} not reached")
        time.sleep(0.1)


def _resume_flag() -> str:
    """``auto`` where this trainer has it (resumes from the latest checkpoint, or starts fresh), else ``latest``."""
    field = next(f for f in dataclasses.fields(TrainerConfig) if f.name == "resume_from_checkpoint")
    return "auto" if "auto" in field.metadata["help"] else "latest"


def _pod_command(command: list[str]) -> list[str]:
    """The trainer container's command (the Kubernetes Job's): the launcher under deploy/relay_sigterm.py, which
    passes the pod's SIGTERM on to the training ranks (DeepSpeed's single-node runner does not)."""
    return [sys.executable, str(REPO / "deploy" / "relay_sigterm.py"), *command]


def _preempt(proc: subprocess.Popen[bytes], how: str, grace: float) -> tuple[int, bool]:
    """As the kubelet evicts a pod: ``how`` (TERM) to the launcher, then after ``grace`` seconds SIGKILL to every
    process of the pod (here: the launcher's session). (launcher exit code, whether all stopped within the grace)."""
    if how == "TERM":
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # reaped: an unreaped launcher would keep its group "alive" as a zombie
                try:
                    os.killpg(proc.pid, 0)  # any other process of the session left?
                except ProcessLookupError:
                    return proc.returncode, True
            time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(), False


class Replicas:
    """The teacher replicas, each restartable on its own port."""

    def __init__(self, assets: TinyAssets, n: int, logs: Path) -> None:
        self.assets, self.logs = assets, logs
        self.procs = [self._start(i, None) for i in range(n)]

    def _start(self, i: int, port: int | None) -> TeacherProcess:
        log = self.logs / f"teacher{i}-{time.monotonic_ns()}.log"
        # one request per engine batch: a batch's padding moves the teacher's float32 rows in their last bits, and
        # which requests share a batch depends on timing; without merging, weights can be compared exactly
        args = ["--max-top-k", "32", "--max-batch-requests", "1"]
        return TeacherProcess(self.assets.teacher, extra_args=args, port=port, log_path=log).start()

    @property
    def urls(self) -> str:
        return ",".join(p.url for p in self.procs)

    def kill(self, i: int) -> None:
        proc = self.procs[i].proc
        assert proc is not None
        proc.kill()
        proc.wait()

    def restart(self, i: int) -> None:
        self.procs[i] = self._start(i, self.procs[i].port)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def run(assets: TinyAssets, out: Path, args: argparse.Namespace, chaos: bool) -> dict[str, Any]:
    replicas = Replicas(assets, 2, out.parent)
    flags = ["--teacher_url", replicas.urls, "--top_k", "16", "--deepspeed", str(REPO / "deploy" / "ds_zero2.json"),
             "--max_steps", str(args.steps), "--logging_steps", "1", "--save_steps", str(args.save_steps)]  # fmt: skip
    events: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with (out.parent / f"{out.name}-trainer.log").open("ab") as log:
            proc = subprocess.Popen(
                _pod_command(trainer_command(assets, out, *flags)),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
            if chaos:
                _wait_step(proc, out, args.outage_step)
                t0 = time.perf_counter()
                replicas.kill(0)
                replicas.kill(1)
                time.sleep(args.pause)
                second = threading.Thread(target=replicas.restart, args=(1,))  # the trainer goes on meanwhile
                second.start()
                replicas.restart(0)
                events["outage_s"] = time.perf_counter() - t0
                second.join()
                _wait_step(proc, out, args.replica_loss_step)
                replicas.kill(1)
                _wait_step(proc, out, args.preempt_step)
                events["preempted_at"] = max(_log_steps(out))
                events["preempted_rc"], events["stopped_within_grace"] = _preempt(proc, args.preempt_signal, args.grace)
                events["last_step_before_resume"] = max(_log_steps(out))
                if events["last_step_before_resume"] >= args.steps:
                    raise RuntimeError("the run finished within the grace period: preempt earlier or shorten --grace")
                resume = _resume_flag()
                events["resume_flag"] = resume  # type: ignore[assignment]
                proc = subprocess.Popen(
                    _pod_command(trainer_command(assets, out, *flags, "--resume_from_checkpoint", resume)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    start_new_session=True,
                )
            rc = proc.wait(timeout=1800)
    finally:
        replicas.stop()
    wall = time.perf_counter() - started
    if rc != 0:
        raise RuntimeError(f"trainer exited with {rc}; see {out.parent}/{out.name}-trainer.log")
    steps = _log_steps(out)
    counts = collections.Counter(steps)
    return {
        "wall_s": wall,
        "lost_steps": sum(n - 1 for n in counts.values()),
        "missing_steps": len(set(range(1, args.steps + 1)) - set(counts)),
        **events,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--outage-step", type=int, default=10)
    parser.add_argument("--pause", type=float, default=20.0, help="seconds both replicas stay down")
    parser.add_argument("--replica-loss-step", type=int, default=25)
    parser.add_argument("--preempt-step", type=int, default=37)
    parser.add_argument("--preempt-signal", choices=["TERM", "KILL"], default="TERM")
    parser.add_argument(
        "--grace", type=float, default=60.0, help="seconds from SIGTERM to SIGKILL (the pod's grace period)"
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "cache", help="tiny model cache (demo.tiny)")
    args = parser.parse_args()
    assets = build_assets(args.cache)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        base = run(assets, root / "undisturbed", args, chaos=False)
        chaos = run(assets, root / "chaos", args, chaos=True)
        a = load_file(root / "undisturbed" / "final" / "model.safetensors")
        b = load_file(root / "chaos" / "final" / "model.safetensors")
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    report = {
        "machine": machine(),
        "steps": args.steps,
        "undisturbed_wall_s": round(base["wall_s"], 1),
        "chaos_wall_s": round(chaos["wall_s"], 1),
        "wall_ratio": round(chaos["wall_s"] / base["wall_s"], 2),
        "wall_ratio_without_pause": round((chaos["wall_s"] - chaos["outage_s"]) / base["wall_s"], 2),
        "outage_s": round(chaos["outage_s"], 1),
        "lost_steps": chaos["lost_steps"],
        "missing_steps": chaos["missing_steps"],
        "preempted_at_step": chaos["preempted_at"],
        "preempt_signal": args.preempt_signal,
        "preempted_exit_code": chaos["preempted_rc"],
        "stopped_within_grace": chaos["stopped_within_grace"],
        "last_logged_step_at_stop": chaos["last_step_before_resume"],
        "resume_from_checkpoint": chaos["resume_flag"],
        "final_weights_max_abs_diff": diff,
        "final_weights_equal": bool(all(torch.allclose(b[k].float(), a[k].float(), rtol=1e-4, atol=1e-5) for k in a)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
