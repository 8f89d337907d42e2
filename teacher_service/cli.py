"""Command line: flags are generated from :class:`ServiceConfig`, so defaults live in one place."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from teacher_service.config import ServiceConfig
from teacher_service.flags import add_model_flags, configure_logging, parse_model


def build_parser() -> argparse.ArgumentParser:
    """The service's CLI, one flag per :class:`ServiceConfig` field (docs/teacher.md's reference is made from it)."""
    parser = argparse.ArgumentParser(
        prog="python -m teacher_service",
        description="Serve a teacher LLM's top-k log-probs for knowledge distillation. "
        "`gkd-teacher precompute --help`: fill a teacher cache offline instead.",
    )
    add_model_flags(parser, ServiceConfig)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> ServiceConfig:
    return parse_model(build_parser(), argv, ServiceConfig)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve (``gkd-teacher --model DIR ...``), or ``gkd-teacher precompute ...`` (:mod:`.precompute`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["precompute"]:
        from teacher_service.precompute import main as precompute

        precompute(args[1:])
        return
    import uvicorn

    from teacher_service.app import create_app

    config = parse_config(args)
    configure_logging(config.log_level, config.log_format)
    try:
        app = create_app(config)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"teacher_service: {exc}") from exc
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        log_config=None,  # keep the root handler above: request ids, JSON
        access_log=False,  # the request middleware logs each request once, with its id
        timeout_graceful_shutdown=config.drain_timeout,
    )
