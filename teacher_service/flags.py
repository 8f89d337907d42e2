"""Flags made from pydantic settings (one per field, vLLM-style hyphenated) and the root logging set-up:
what the service's command line and ``gkd-teacher precompute`` share."""

from __future__ import annotations

import argparse
import logging
import typing
from collections.abc import Sequence

from pydantic import BaseModel, ValidationError

M = typing.TypeVar("M", bound=BaseModel)


def flag_name(name: str) -> str:
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
        parser.add_argument(flag_name(name), **kwargs)


def parse_model(parser: argparse.ArgumentParser, argv: Sequence[str] | None, schema: type[M]) -> M:
    """The flags validated by the schema; a value it refuses is a CLI error naming the flag (exit 2)."""
    args = parser.parse_args(argv)
    try:
        return schema(**vars(args))
    except ValidationError as exc:
        first = exc.errors()[0]
        parser.error(f"{flag_name(str(first['loc'][0]))}: {first['msg']}")
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
