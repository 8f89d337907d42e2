"""Compose files, checked offline: each file and each merged model (`-f docker-compose.yml -f
docker-compose.gpu.yml`) against the Compose specification schema after Compose-style interpolation, and the
wiring of the CPU demo and the GPU override: start order, images, volumes, GPUs, secrets, grace periods.

The schema is the copy vendored in PyPI `check-jsonschema` (compose-spec/compose-spec,
schema/compose-spec.json, Apache-2.0), from the dev extra; a missing package fails these tests, never skips them.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from support import (
    COMPOSE_CPU,
    COMPOSE_ENV,
    COMPOSE_GPU,
    COMPOSE_MODELS,
    ComposeLoader,
    argv_value,
    assert_git_ignored,
    drain_timeout,
    interpolate,
    load_compose,
    resolve_tags,
)

from teacher_service.config import DEFAULT_PORT

if TYPE_CHECKING:
    from jsonschema.protocols import Validator


@pytest.fixture(scope="module")
def compose_validator() -> Validator:
    import jsonschema

    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("check-jsonschema is not installed; run `make install` (pyproject dev extra)")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_errors(validator: Validator, data: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(data)]


@pytest.mark.parametrize("path", [COMPOSE_CPU, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(compose_validator: Validator, path: Path) -> None:
    data = resolve_tags(interpolate(yaml.load(path.read_text(), Loader=ComposeLoader), COMPOSE_ENV))
    assert schema_errors(compose_validator, data) == []


@pytest.mark.parametrize("name", COMPOSE_MODELS)
def test_merged_compose_model_matches_the_compose_spec(compose_validator: Validator, name: str) -> None:
    assert schema_errors(compose_validator, load_compose(*COMPOSE_MODELS[name])) == []


def test_compose_schema_check_can_fail(compose_validator: Validator) -> None:
    bad = {"services": {"teacher": {"image": "x", "command": 5, "healthcheck": {"tset": []}}}}
    errors = schema_errors(compose_validator, bad)
    assert any("command" in e for e in errors) and any("tset" in e for e in errors), errors


def test_compose_interpolation_needs_the_models_for_gpu() -> None:
    with pytest.raises(KeyError, match="GKD_TEACHER_MODEL"):
        load_compose(COMPOSE_CPU, COMPOSE_GPU, env={})
    assert load_compose(COMPOSE_CPU, env={})["services"]["teacher"]  # the CPU demo needs no variable


def test_compose_cpu_demo_runs_end_to_end() -> None:
    services = load_compose(COMPOSE_CPU)["services"]
    assert set(services) == {"assets", "teacher", "trainer"}
    assets, teacher, trainer = services["assets"], services["teacher"], services["trainer"]
    # one-shot assets -> teacher healthy -> trainer
    assert teacher["depends_on"] == {"assets": {"condition": "service_completed_successfully"}}
    assert trainer["depends_on"] == {"teacher": {"condition": "service_healthy"}}
    assert assets["command"][:3] == ["python3", "-m", "demo.tiny"]
    assert "/ready" in " ".join(teacher["healthcheck"]["test"])
    # every image is built from one of deploy/Dockerfile.*, none is `latest`
    built = {s["image"]: s["build"]["dockerfile"] for s in services.values() if "build" in s}
    assert set(built.values()) == {"deploy/Dockerfile.trainer", "deploy/Dockerfile.teacher-cpu"}
    for service in services.values():
        assert ":" in service["image"] and not service["image"].endswith(":latest"), service["image"]
        assert service["image"] in built, f"{service['image']} is used but no service builds it"
    # outputs in the named volume
    assert "gkd-data" in load_compose(COMPOSE_CPU)["volumes"]
    assert "gkd-data:/data" in trainer["volumes"]
    out = argv_value(trainer["command"], "--output_dir")
    assert out.startswith("/data/"), out
    # the teacher listens on all interfaces inside its container, published on the host's loopback only
    assert argv_value(teacher["command"], "--host") == "0.0.0.0"
    assert teacher["ports"] == [f"127.0.0.1:{DEFAULT_PORT}:{DEFAULT_PORT}"]


def test_compose_gpu_override_serves_vllm_on_reserved_gpus() -> None:
    raw = yaml.load(COMPOSE_GPU.read_text(), Loader=ComposeLoader)
    model = load_compose(COMPOSE_CPU, COMPOSE_GPU)
    services = model["services"]
    teacher, trainer = services["teacher"], services["trainer"]
    assert services["assets"]["profiles"] == ["cpu-demo"], "the tiny asset build must not run in GPU mode"
    assert "depends_on" not in teacher, "the GPU teacher must not wait for the (disabled) tiny assets"
    assert trainer["depends_on"] == {"teacher": {"condition": "service_healthy"}}
    assert teacher["build"]["dockerfile"] == "deploy/Dockerfile.teacher-gpu"
    assert trainer["build"]["args"]["TORCH_INDEX"].endswith("/cu128")
    assert argv_value(teacher["command"], "--engine") == "vllm"
    # the parallel sizes and the model come from the environment
    raw_teacher = raw["services"]["teacher"]["command"]
    assert argv_value(raw_teacher, "--tensor-parallel-size") == "${TENSOR_PARALLEL_SIZE:-1}"
    assert argv_value(raw_teacher, "--model").startswith("${GKD_TEACHER_MODEL")
    assert argv_value(teacher["command"], "--model") == COMPOSE_ENV["GKD_TEACHER_MODEL"]
    for service in (teacher, trainer):
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert service["secrets"] == ["teacher_api_key"]
        assert "env_file" not in service, "GPU mode takes the key from the secret only"
    assert any(v.endswith(":/models/huggingface") for v in teacher["volumes"]), "HF model cache volume"
    # the key: a file-backed Compose secret; the teacher reads the file, the trainer's entry point exports it
    assert set(model["secrets"]["teacher_api_key"]) == {"file"}
    assert argv_value(teacher["command"], "--api-key-file") == "/run/secrets/teacher_api_key"
    assert "TEACHER_API_KEY_FILE=/run/secrets/teacher_api_key" in trainer["environment"]


def test_compose_files_hold_no_secret() -> None:
    for path in (COMPOSE_CPU, COMPOSE_GPU):
        text = path.read_text()
        # KEY=value or KEY: value for anything that looks like a credential, except file paths and pass-through
        for match in re.finditer(r"(?m)^[\s-]*\"?([A-Z_]*(?:KEY|TOKEN|SECRET|PASSWORD)[A-Z_]*)\s*[:=]\s*(\S.*)$", text):
            name, value = match.groups()
            assert name.endswith("_FILE") or value.startswith("${"), f"{path.name}: {match.group(0).strip()}"
    env_file = load_compose(COMPOSE_CPU)["services"]["teacher"]["env_file"]
    assert env_file == [{"path": "deploy/secrets/teacher.env", "required": False}]
    assert_git_ignored("deploy/secrets/teacher.env", "deploy/secrets/teacher_api_key")


def test_stop_grace_period_exceeds_the_drain_timeout() -> None:
    for name, paths in COMPOSE_MODELS.items():
        teacher = load_compose(*paths)["services"]["teacher"]
        grace = parse_duration(teacher["stop_grace_period"])
        assert grace > drain_timeout(teacher["command"]), f"{name}: stop_grace_period {grace}s"


def parse_duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def test_trainer_stops_with_a_checkpoint_and_resumes() -> None:
    """`docker compose stop` reaches the ranks through the relay, with time for a step and a checkpoint."""
    for name, paths in COMPOSE_MODELS.items():
        trainer = load_compose(*paths)["services"]["trainer"]
        assert trainer["command"][:3] == ["python3", "/app/deploy/relay_sigterm.py", "deepspeed"], name
        assert parse_duration(trainer["stop_grace_period"]) >= 60, name
