"""Helpers shared by the benchmarks: timing and a description of the machine for the report."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    return median_times([fn], repeat, warmup)[0]


def median_times(fns: list[Callable[[], object]], repeat: int, warmup: int = 1) -> list[float]:
    """Median wall times of ``fns``, run in turn ``repeat`` times: a baseline and the candidate share whatever
    load the machine has at each moment, so their ratio holds even where the absolute times drift."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, kept in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - t0)
    return [statistics.median(kept) for kept in times]
