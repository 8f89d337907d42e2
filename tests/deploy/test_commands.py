"""Every command a container runs, parsed by the CLI that will run it: the Compose services and their
healthchecks, the Dockerfiles' CMDs, and the containers of every rendered Kubernetes variant (`$(VAR)`
references expanded from the container's env). The teacher must bind 0.0.0.0 on the default port, the
trainer must reach the teacher at its in-cluster or in-compose address and name a DeepSpeed config that exists.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    CLUSTER_TEACHER_URL,
    COMPOSE_MODELS,
    COMPOSE_TEACHER_URL,
    DEPLOY,
    DOCKERFILES,
    VARIANTS,
    RenderedManifests,
    containers,
    exec_form,
    load_compose,
    load_module,
    pod_specs,
    stages,
)

from teacher_service.config import DEFAULT_PORT


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
    out: list[tuple[str, list[str]]] = []
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
def test_k8s_commands_are_accepted_by_their_clis(rendered: RenderedManifests, variant: str) -> None:
    docs = rendered[variant]
    failures: list[str] = []
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
    if program in ("python", "python3") and argv[1] == "/app/deploy/relay_sigterm.py":
        assert argv[2:3] == ["deepspeed"], f"{where}: relay_sigterm.py runs the DeepSpeed launcher"
        check_command(where, argv[2:], in_cluster)
        assert "--resume_from_checkpoint" in argv and argv[argv.index("--resume_from_checkpoint") + 1] == "auto", (
            f"{where}: a restarted trainer continues by itself only with --resume_from_checkpoint auto"
        )
        return
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


def parse_with(where: str, program: str, parse: Callable[[list[str]], Any], args: list[str]) -> Any:
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

    calls: list[tuple[Path, dict[str, Any]]] = []
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
