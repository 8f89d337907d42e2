"""Reading request bodies within a byte limit, parsed into the wire schemas with field-naming errors."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from teacher_service.errors import ServiceError, from_validation_errors

M = TypeVar("M", bound=BaseModel)


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_json_body(request: Request, schema: type[M], limit: int) -> M:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ServiceError(
            415, f"content-type must be application/json, got {content_type or 'none'!r}", "content-type"
        )
    body = await read_limited_body(request, limit)
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from exc
