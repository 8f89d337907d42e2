"""Run the teacher service as a child process (demo, tests, notebooks) and wait until it is ready."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class TeacherProcess:
    """``python -m teacher_service`` on a free loopback port; a context manager that always stops it.

    ``start`` returns once ``/ready`` answers 200 (engine loaded and warmed up).
    """

    def __init__(
        self,
        model: str | Path,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 180.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host, self.port = host, port or free_port(host)
        self.args = [
            sys.executable,
            "-m",
            "teacher_service",
            "--model",
            str(model),
            "--host",
            host,
            "--port",
            str(self.port),
            *extra_args,
        ]
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> TeacherProcess:
        out = self.log_path.open("wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"teacher service exited with code {self.proc.returncode} during start-up"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    logger.info("teacher service ready at %s", self.url)
                    return self
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"teacher service not ready within {self.startup_timeout:.0f}s")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> TeacherProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
