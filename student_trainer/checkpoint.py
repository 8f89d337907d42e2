"""DeepSpeed checkpoints with the trainer's own state, so a resumed run continues exactly.

``client_state`` holds the step, the data position of the last *consumed* micro-batch
(the prefetcher reads the data iterator ahead, so the iterator's own position would
skip the prefetched batches on resume), and every rank's RNG states.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"


def checkpoint_tag(step: int) -> str:
    return f"step-{step}"


def resolve_resume(spec: str, output_dir: str | Path) -> tuple[Path, str]:
    """(checkpoints root, tag) for ``--resume_from_checkpoint``: ``latest``, a root with ``latest``, or a tag dir."""
    path = Path(output_dir) / CHECKPOINTS_DIR if spec == "latest" else Path(spec)
    if spec != "latest" and not (path / "latest").is_file():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist")
        return path.parent, path.name
    latest = path / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"no checkpoint to resume: {latest} does not exist")
    tag = latest.read_text().strip()
    if not (path / tag).is_dir():
        raise FileNotFoundError(f"{latest} names {tag!r}, but {path / tag} does not exist")
    return path, tag


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine: Any, root: Path, step: int, data_state: dict[str, int]) -> None:
    """All ranks call this (DeepSpeed saves each rank's optimizer shard).

    Frozen parameters (a LoRA student's base) are left out: they are reloaded from the base model.
    """
    world = dist.get_world_size()
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    client_state = {"step": step, "data": data_state, "rng": states, "world_size": world}
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    engine.save_checkpoint(
        str(root), tag=checkpoint_tag(step), client_state=client_state, exclude_frozen_parameters=frozen
    )
    logger.info("saved checkpoint %s", root / checkpoint_tag(step))


def load_checkpoint(engine: Any, root: Path, tag: str) -> tuple[int, dict[str, int]]:
    """Weights, optimizer and scheduler into ``engine``; this rank's RNG; returns (step, data position)."""
    frozen = any(not p.requires_grad for p in engine.module.parameters())  # saved without: not in the file
    path, client = engine.load_checkpoint(str(root), tag=tag, load_module_strict=not frozen)
    if path is None or not client:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {root}")
    world = dist.get_world_size()
    if client["world_size"] != world:
        raise ValueError(
            f"checkpoint {root / tag} was written by {client['world_size']} ranks, this run has {world}: "
            "an exact resume needs the same number of data-parallel ranks"
        )
    set_rng_state(client["rng"][dist.get_rank()])
    logger.info("resumed from %s at step %d", root / tag, client["step"])
    return int(client["step"]), dict(client["data"])


def export_pretrained(engine: Any, tokenizer: Any, out: Path, lora: LoraExport | None = None) -> None:
    """``save_pretrained`` of the trained student on rank 0; ZeRO-3 shards are gathered parameter by parameter.

    A LoRA student is exported merged into a plain model or as its adapter (``lora``).
    """
    import deepspeed

    model = engine.module.model
    is_main = dist.get_rank() == 0
    state = None
    if engine.zero_optimization_stage() == 3:
        state = {}
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_main:
                    state[name] = param.detach().cpu().clone()
    if is_main:
        if lora is not None:
            from student_trainer.lora import export_lora

            full = state if state is not None else {n: p.detach().cpu() for n, p in model.named_parameters()}
            export_lora(full, lora.base_path, lora.config, out, merged=lora.merged)
        else:
            model.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
        logger.info("exported the student to %s%s", out, "" if lora is None else f" ({lora.kind})")


@dataclass(frozen=True)
class LoraExport:
    """How to export a LoRA student: its base model, its peft config, merged or the adapter."""

    base_path: str
    config: Any
    merged: bool

    @property
    def kind(self) -> str:
        return "LoRA merged" if self.merged else "LoRA adapter"
