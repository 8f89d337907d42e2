"""Preemption: SIGTERM (a pod evicted or drained, a spot node reclaimed) ends the run at an optimizer-step
boundary, with a checkpoint, instead of killing it mid-step.

The signal handler only sets a flag. At each step boundary every rank all-reduces its flag (MAX), so all
ranks stop after the same step even when the signal reached only some of them (DeepSpeed's launcher
signals its ranks one after another; a drained node signals only its own ranks): the checkpoint that
follows is collective, and a rank stopping alone would leave the others waiting in it forever.

A preempted run exits with :data:`PREEMPTED_EXIT_CODE`, never 0: it has not reached ``--max_steps``, and a
Kubernetes Job takes exit 0 for a completed run and would not start it again (docs/deployment.md).
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 143
"""128 + SIGTERM: what a shell, Kubernetes and Kubeflow's ``ExitCode`` restart policy read as "terminated,
retry"; the Job's podFailurePolicy restarts a pod that exits with it."""


class Preempted(Exception):
    """Every rank stopped after ``step`` on SIGTERM; ``checkpoint`` holds it (None: nothing trained to save)."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "nothing trained since the start"
        super().__init__(f"stopped on SIGTERM after step {step} ({where})")
        self.step, self.checkpoint = step, checkpoint


class StopSignal:
    """SIGTERM sets a flag; :meth:`agreed` tells every rank, at a step boundary, whether any rank got it."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.received: str | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # nothing else here: a handler runs between any two bytecodes, even inside a logging call
        self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """This rank got the signal (no communication: for waits that should end early)."""
        return self.received is not None

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank got the signal: a collective, every rank calls it at the same step boundary."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
