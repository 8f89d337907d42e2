"""The scripts the images run: deploy/healthcheck.py against a live HTTP server (ready, not ready, waiting,
server gone), deploy/docker-entrypoint.sh exporting TEACHER_API_KEY from TEACHER_API_KEY_FILE, and
deploy/relay_sigterm.py relaying SIGTERM to the training ranks (the real launch: test_train_deepspeed.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support import DEPLOY, run


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


# A stand-in for `deepspeed`'s process tree: runner -> per-node launcher (its command line names
# deepspeed.launcher.launch, as DeepSpeed's does) -> two ranks. Every process notes a SIGTERM in a file; a
# rank then exits 143 as the trainer does after its checkpoint, the others carry on.
FAKE_DEEPSPEED = """
import pathlib, signal, subprocess, sys, time
role, out = sys.argv[1], pathlib.Path(sys.argv[-1])
term = []
def note(signum, frame):
    (out / f"{role}.sigterm").touch()
    term.append(signum)
signal.signal(signal.SIGTERM, note)
if role.startswith("rank"):
    (out / f"{role}.ready").touch()
    while not term:
        time.sleep(0.02)
    sys.exit(143)
children = (["launcher", "deepspeed.launcher.launch"],) if role == "runner" else (["rank0"], ["rank1"])
procs = [subprocess.Popen([sys.executable, __file__, *args, str(out)]) for args in children]
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
"""


def test_relay_sigterm_signals_the_ranks_and_passes_their_exit_code_on(tmp_path: Path) -> None:
    fake = tmp_path / "fake_deepspeed.py"
    fake.write_text(FAKE_DEEPSPEED)
    relay = [sys.executable, str(DEPLOY / "relay_sigterm.py")]
    proc = subprocess.Popen([*relay, sys.executable, str(fake), "runner", str(tmp_path)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"rank{i}.ready").exists() for i in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, "the fake ranks did not start"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert sorted(p.name for p in tmp_path.glob("*.sigterm")) == ["rank0.sigterm", "rank1.sigterm"]  # launchers: no
    assert b"SIGTERM relayed to the training ranks" in stderr

    # nothing to relay to yet: the command's whole process group is stopped
    sleeper = subprocess.Popen([*relay, sys.executable, "-c", "import time; time.sleep(60)"], stderr=subprocess.PIPE)
    time.sleep(0.5)
    sleeper.send_signal(signal.SIGTERM)
    _, stderr = sleeper.communicate(timeout=30)
    assert sleeper.returncode == 128 + signal.SIGTERM and b"no training rank yet" in stderr
    assert run([*relay]).returncode == 64 and run([*relay, "--help"]).stdout.startswith("The trainer container")
