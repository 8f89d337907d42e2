"""Container health check with the standard library only (no curl in the images).

    python3 healthcheck.py [URL]              exit 0 if GET URL answers 2xx, else 1
    python3 healthcheck.py --wait SECONDS URL poll until it does (an init container waiting for the teacher)

URL defaults to $GKD_HEALTHCHECK_URL, else the teacher's readiness endpoint on its default port,
http://127.0.0.1:8000/ready (503 until the engine is loaded and warmed up). Proxies are bypassed:
the check is about this container or this cluster, never a proxy's idea of it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/ready"


def check(url: str, timeout: float) -> str | None:
    """None when healthy, else the reason."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return str(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default=os.environ.get("GKD_HEALTHCHECK_URL", DEFAULT_URL))
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per request (default: 3)")
    parser.add_argument("--wait", type=float, default=0.0, help="keep polling for up to this many seconds")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls with --wait")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        reason = check(args.url, args.timeout)
        if reason is None:
            if args.wait:
                print(f"ready: {args.url}", flush=True)
            return 0
        if time.monotonic() + args.interval > deadline:
            print(f"unhealthy: {args.url}: {reason}", file=sys.stderr)
            return 1
        print(f"waiting for {args.url}: {reason}", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
