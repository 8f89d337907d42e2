"""DeepSpeed JSON configs: read, checked and patched before any model loads.

The configs in deploy/ use explicit values only. ``"auto"`` (a Hugging Face Trainer
convention that DeepSpeed itself does not resolve) is refused, and ``--bf16`` enables
the config's bf16 section only where the hardware has bf16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config cannot be used as given."""


def _auto_keys(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_keys(value, f"{path}.{key}" if path else key)]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in _auto_keys(value, f"{path}[{i}]")]
    return [path] if node == "auto" else []


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_deepspeed_config(path: str | Path, bf16: bool = False) -> dict[str, Any]:
    """The config as a dict, with ``bf16.enabled`` set from ``bf16`` (the ``--bf16`` flag)."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DeepSpeedConfigError(f"--deepspeed {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise DeepSpeedConfigError(f"--deepspeed {path} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"--deepspeed {path}: expected a JSON object")
    auto = _auto_keys(config)
    if auto:
        raise DeepSpeedConfigError(f"--deepspeed {path}: 'auto' is not resolved by this trainer; set {auto}")
    if "train_micro_batch_size_per_gpu" not in config:
        raise DeepSpeedConfigError(f"--deepspeed {path}: set train_micro_batch_size_per_gpu")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"--deepspeed {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    if config.get("fp16", {}).get("enabled"):
        raise DeepSpeedConfigError(f"--deepspeed {path}: fp16 is not supported (use --bf16 on hardware with bf16)")
    if config.get("bf16", {}).get("enabled") and not bf16:
        raise DeepSpeedConfigError(f"--deepspeed {path} enables bf16: pass --bf16 instead, and keep it false")
    if bf16:
        if not bf16_available():
            raise DeepSpeedConfigError("--bf16: this machine has no GPU with bf16 support; train in fp32 without it")
        config["bf16"] = {**config.get("bf16", {}), "enabled": True}
    return config
