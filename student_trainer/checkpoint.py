"""DeepSpeed checkpoints with the trainer's own state, so a resumed run continues exactly.

``client_state`` holds the step, the data position of the last *consumed* micro-batch
(the prefetcher reads the data iterator ahead, so the iterator's own position would
skip the prefetched batches on resume), and every rank's RNG states.

A checkpoint is complete once every rank has written its files: DeepSpeed's ``latest`` file is
written by rank 0 before the other ranks are known to be done, so after the collective save rank 0
writes a manifest (:data:`MANIFEST`: every file and its size). ``--resume_from_checkpoint auto``
resumes from the newest checkpoint whose manifest matches its files, skipping one cut short by a kill.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "gkd_manifest.json"
AUTO = "auto"
_TAG = re.compile(r"step-(\d+)")


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


def incomplete(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be resumed from, or None when its manifest matches."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (its save did not finish)"
    try:
        files: dict[str, int] = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, size in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if (path / name).stat().st_size != size:
            return f"{name} has {(path / name).stat().st_size} bytes, the manifest says {size}"
    return None


def latest_complete(output_dir: str | Path) -> tuple[Path, str] | None:
    """(checkpoints root, tag) of the newest complete ``step-N`` in output_dir/checkpoints, or None."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _TAG.fullmatch(p.name)) and p.is_dir()]
    for _, path in sorted(found, reverse=True):
        problem = incomplete(path)
        if problem is None:
            return root, path.name
        logger.warning("not resuming from %s: %s", path, problem)
    return None


def resume_point(spec: str | None, output_dir: str | Path) -> tuple[Path, str] | None:
    """(root, tag) that ``--resume_from_checkpoint`` names; None starts fresh (no flag, or ``auto`` and no
    complete checkpoint in output_dir/checkpoints)."""
    if spec is None:
        return None
    if spec == AUTO:
        return latest_complete(output_dir)
    return resolve_resume(spec, output_dir)


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
    tag = checkpoint_tag(step)
    if dist.get_rank() == 0:  # a tag saved again (a resume from an older checkpoint) is incomplete until done
        (root / tag / MANIFEST).unlink(missing_ok=True)
    frozen = any(not p.requires_grad for p in engine.module.parameters())  # LoRA: the adapters only
    engine.save_checkpoint(  # ends with a barrier: all written
        str(root), tag=tag, client_state=client_state, exclude_frozen_parameters=frozen
    )
    if dist.get_rank() == 0:
        files = {
            str(f.relative_to(root / tag)): f.stat().st_size
            for f in sorted((root / tag).rglob("*"))
            if f.is_file() and not f.name.startswith(MANIFEST)
        }
        partial = root / tag / f"{MANIFEST}.partial"
        partial.write_text(json.dumps({"step": step, "world_size": world, "files": files}, indent=1))
        partial.replace(root / tag / MANIFEST)
    dist.barrier()
    logger.info("saved checkpoint %s", root / tag)


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
