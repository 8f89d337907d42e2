"""`POST /v1/topk_logprobs`: admission, body, content negotiation; the rest is :class:`TopkServing`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from shared.protocol import TOPK_MEDIA_TYPE, TopkRequest
from teacher_service.api.topk.serving import TopkServing
from teacher_service.body import parse_json_body
from teacher_service.deps import admitted

router = APIRouter()

Serving = Annotated[TopkServing, Depends(TopkServing.dependency)]


def wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and TOPK_MEDIA_TYPE not in accept


@router.post(
    "/v1/topk_logprobs",
    dependencies=[Depends(admitted)],
    responses={200: {"content": {TOPK_MEDIA_TYPE: {}, "application/json": {}}}},
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": TopkRequest.model_json_schema()}}}
    },
)
async def topk_logprobs(request: Request, serving: Serving) -> Response:
    """Top-k teacher log-probs for every requested row of every sequence (binary frame by default)."""
    req = await parse_json_body(request, TopkRequest, serving.config.max_body_bytes)
    return await serving.create_topk(req, as_json=wants_json(request))
