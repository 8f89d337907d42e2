"""What identifies the served weights in a teacher-cache key, when the operator does not name it.

A served model name says nothing about which checkpoint is behind it, and hashing a 140 GB checkpoint at
start-up is out of the question. The digest covers the model directory's config files whole and, per
weight file, its name, its size and three 64 KiB samples (start, middle, end): a fine-tune changes every
weight, so two checkpoints of one architecture differ in the samples. ``--model-revision`` overrides it
(a git commit, a training run id) where the operator knows better.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_CONFIGS = ("config.json", "generation_config.json")
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_SAMPLE = 64 * 1024


@functools.lru_cache(maxsize=8)
def model_dir_revision(model_dir: str) -> str:
    """``sampled-sha256:<hex>`` of the directory's configs and sampled weight bytes (see the module doc)."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for name in _CONFIGS:
        path = root / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    weights = sorted({p for pattern in _WEIGHTS for p in root.glob(pattern)})
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            for offset in sorted({0, max(size // 2 - _SAMPLE // 2, 0), max(size - _SAMPLE, 0)}):
                f.seek(offset)
                digest.update(f.read(_SAMPLE))
    return "sampled-sha256:" + digest.hexdigest()[:32]


def served_revision(model_dir: str | None, configured: str | None) -> str | None:
    """``--model-revision`` if given, else the model directory's digest (None for an engine without one)."""
    if configured:
        return configured
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    return model_dir_revision(model_dir)
