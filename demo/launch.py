"""The trainer's command line as DeepSpeed users type it, for the demo and the tests."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from demo.tiny import TinyAssets
from teacher_service.process import free_port


def trainer_command(
    assets: TinyAssets, out: Path, *extra: str, ranks: int = 2, dataset: Path | None = None
) -> list[str]:
    """`deepspeed --num_gpus N --master_port <free> --module student_trainer` on the tiny student and data
    (the plain prompt/completion file unless ``dataset`` names another)."""
    search = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    launcher = shutil.which("deepspeed", path=search)
    if launcher is None:
        raise FileNotFoundError("the `deepspeed` launcher is not installed (pip install '.[trainer]')")
    return [
        launcher,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "--module",
        "student_trainer",
        "--model_name_or_path",
        str(assets.student),
        "--dataset",
        str(dataset or assets.train_file),
        "--output_dir",
        str(out),
        *extra,
    ]
