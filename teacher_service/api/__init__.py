"""The /v1 API, laid out as vLLM's OpenAI server is: per endpoint family a thin ``router``, a ``serving``
module with the logic (checks shared in :mod:`teacher_service.api.serving_base`) and, where the wire
schemas are not already in :mod:`shared.protocol`, a pydantic-only ``protocol`` module."""

from fastapi import APIRouter

from teacher_service.api.completions.router import router as completions_router
from teacher_service.api.models.router import router as models_router
from teacher_service.api.topk.router import router as topk_router

API_ROUTERS: tuple[APIRouter, ...] = (models_router, topk_router, completions_router)
"""Every /v1 router (and vLLM's /tokenize), registered behind the API key by ``create_app``."""

__all__ = ["API_ROUTERS"]
