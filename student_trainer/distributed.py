"""The process group, created once per rank, without leaving DeepSpeed's shared memory behind.

On CPU, DeepSpeed's all-reduce (``deepspeed_shm_comm``) maps one ``/dev/shm`` file per rank, named
``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (about 66 MB), and never unlinks it:
each run used to leave ``ranks x 66 MB`` of RAM in ``/dev/shm`` until reboot, more with every restart of a
preempted job. Once every rank has mapped every file (a barrier after the group is made), the names can go:
the mappings stay valid and the memory is freed when the last rank exits, even on SIGKILL.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_workspace(rank: int) -> Path:
    """The ``/dev/shm`` file DeepSpeed's CPU all-reduce maps for ``rank`` in this process group."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def init_distributed(timeout: timedelta) -> None:
    """``deepspeed.init_distributed`` (NCCL on GPUs, gloo on CPUs), then this rank's shm name unlinked."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    if torch.cuda.is_available():
        return
    dist.barrier()  # every rank has mapped every rank's file: DeepSpeed maps them all before init returns
    path = shm_workspace(dist.get_rank())
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # not ours to remove (another user): DeepSpeed still works, the file stays
        logger.warning("could not unlink DeepSpeed's shared memory %s: %s", path, exc)
