"""`GET /v1/models` and `GET /v1/info`."""

from __future__ import annotations

from fastapi import APIRouter, Request

from shared.protocol import ModelList, TeacherInfo
from teacher_service.api.models.serving import model_list, teacher_info
from teacher_service.deps import Config, Engine

router = APIRouter()


@router.get("/v1/models")
async def list_models(engine: Engine, request: Request) -> ModelList:
    return model_list(engine, request.app.state.created)


@router.get("/v1/info")
async def info(engine: Engine, config: Config) -> TeacherInfo:
    return teacher_info(engine, config)
