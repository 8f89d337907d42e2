"""Command line: flags are generated from :class:`ServiceConfig`, so defaults live in one place."""

from __future__ import annotations

import argparse
import logging
import typing
from collections.abc import Sequence

from pydantic import BaseModel, ValidationError

from teacher_service.config import ServiceConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_flags(parser: argparse.ArgumentParser, schema: type[BaseModel]) -> None:
    """One flag per field, typed and documented from the schema (vLLM-style hyphenated names)."""
    for name, field in schema.model_fields.items():
        ann = field.annotation
        kwargs: dict[str, typing.Any] = {"dest": name, "help": field.description or ""}
        origin = typing.get_origin(ann)
        if origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(ann))
        elif ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif ann in (int, float):
            kwargs["type"] = ann
        if field.is_required():
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default
            kwargs["help"] += f" (default: {field.default})"
        parser.add_argument(_flag(name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The service's CLI, one flag per :class:`ServiceConfig` field (docs/teacher.md's reference is made from it)."""
    parser = argparse.ArgumentParser(
        prog="python -m teacher_service",
        description="Serve a teacher LLM's top-k log-probs for knowledge distillation.",
    )
    add_model_flags(parser, ServiceConfig)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> ServiceConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ServiceConfig(**vars(args))
    except ValidationError as exc:
        first = exc.errors()[0]
        parser.error(f"{_flag(str(first['loc'][0]))}: {first['msg']}")
        raise  # unreachable: parser.error exits


def configure_logging(level: str, fmt: str) -> None:
    """Root logging with the request id on every line; ``json`` gives one JSON object per line."""
    from teacher_service.middleware import RequestIdFilter

    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    from teacher_service.app import create_app

    config = parse_config(argv)
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
