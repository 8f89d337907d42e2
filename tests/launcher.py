"""Launch the trainer the way DeepSpeed users do: `deepspeed --num_gpus N --module student_trainer ...`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from demo.launch import trainer_command
from demo.tiny import TinyAssets

REPO = Path(__file__).resolve().parents[1]


def launch(
    assets: TinyAssets, out: Path, *extra: str, ranks: int = 2, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trainer_command(assets, out, *extra, ranks=ranks), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ds_config(tmp: Path, base: str = "ds_zero2.json", drop: tuple[str, ...] = (), **overrides: Any) -> Path:
    """A copy of a deploy/ config with top-level keys replaced or dropped."""
    config = json.loads((REPO / "deploy" / base).read_text())
    config.update(overrides)
    for key in drop:
        config.pop(key)
    name = f"{Path(base).stem}-test.json"
    path = tmp / name
    path.write_text(json.dumps(config))
    return path


def failure_output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout[-4000:] + proc.stderr[-4000:]
