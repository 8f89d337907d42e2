"""One default teacher port and URL everywhere: the service's and the trainer's defaults, the healthcheck
script, and every teacher address or port named in the Compose files, Dockerfiles, Kubernetes manifests,
README and docs/deployment.md (which names the local, in-cluster and in-compose URLs); the README links
the deployment guide.
"""

from __future__ import annotations

import re
from pathlib import Path

from support import (
    CLUSTER_TEACHER_URL,
    COMPOSE_CPU,
    COMPOSE_GPU,
    COMPOSE_TEACHER_URL,
    DEPLOY,
    DOCKERFILES,
    K8S,
    REPO,
    load_module,
)

from student_trainer.config import DEFAULT_TEACHER_URL
from teacher_service.config import DEFAULT_PORT, ServiceConfig

# Addresses of the teacher: local, in-compose and in-cluster.
TEACHER_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0", "teacher", "gkd-teacher")
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
