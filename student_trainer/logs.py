"""Rank-0 run logs: JSONL records (train_log.jsonl, eval_log.jsonl) and TensorBoard scalars; upstream noise kept
off the user's terminal."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any


class RunLog:
    """Does nothing on ranks other than 0; appends when a run resumes into its own output directory."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, append: bool) -> None:
        self.enabled = enabled
        self._files: dict[str, Any] = {}
        self._writer = None
        if not enabled:
            return
        mode = "a" if append else "w"
        self._files = {split: (out_dir / f"{split}_log.jsonl").open(mode) for split in ("train", "eval")}
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def write(self, split: str, step: int, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        f = self._files[split]
        f.write(json.dumps({"step": step, **record}) + "\n")
        f.flush()
        if self._writer is not None:
            for key, value in record.items():
                self._writer.add_scalar(f"{split}/{key}", value, step)
            self._writer.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        if self._writer is not None:
            self._writer.close()


def quiet_upstream_warnings() -> None:
    """Silence deprecations that DeepSpeed triggers in torch.distributed on every collective (dozens per run).

    Only these known upstream messages: this project's own warnings, and any other, still show.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.[\w.]+` (is deprecated|is a private function|will be deprecated)",
        category=FutureWarning,
    )
