"""`POST /v1/completions` and `POST /tokenize`: admission and body; the rest is :class:`CompletionServing`."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from teacher_service.api.completions.protocol import CompletionRequest, TokenizeRequest
from teacher_service.api.completions.serving import CompletionServing
from teacher_service.body import parse_json_body
from teacher_service.deps import admitted

router = APIRouter()

Serving = Annotated[CompletionServing, Depends(CompletionServing.dependency)]


@router.post("/tokenize")
async def tokenize(request: Request, serving: Serving) -> dict[str, Any]:
    req = await parse_json_body(request, TokenizeRequest, serving.config.max_body_bytes)
    return serving.tokenize(req)


@router.post("/v1/completions", dependencies=[Depends(admitted)])
async def completions(request: Request, serving: Serving) -> Response:
    req = await parse_json_body(request, CompletionRequest, serving.config.max_body_bytes)
    return Response(orjson.dumps(await serving.create_completion(req)), media_type="application/json")
