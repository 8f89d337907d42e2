"""The scripts the images run: deploy/healthcheck.py against a live HTTP server (ready, not ready, waiting,
server gone) and deploy/docker-entrypoint.sh exporting TEACHER_API_KEY from TEACHER_API_KEY_FILE.
"""

from __future__ import annotations

import sys
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
