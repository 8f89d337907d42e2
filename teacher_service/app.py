"""Application factory: the engine is opened in the lifespan and kept on ``app.state``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from teacher_service.config import ServiceConfig
from teacher_service.engines.base import TeacherEngine
from teacher_service.errors import install_error_handlers
from teacher_service.routes import router

logger = logging.getLogger(__name__)


def build_engine(config: ServiceConfig) -> TeacherEngine:
    if config.engine == "transformers":
        from teacher_service.engines.hf import HFEngine

        return HFEngine(
            config.model,
            served_model_name=config.served_model_name,
            dtype=config.dtype,
            device=config.device,
            max_batch_tokens=config.max_batch_tokens,
        )
    if config.engine == "vllm":
        # Imported here: vLLM is an optional extra (a multi-GB install), not needed by the default engine.
        from teacher_service.engines.vllm import VLLMEngine

        return VLLMEngine(
            config.model,
            served_model_name=config.served_model_name,
            max_top_k=config.max_top_k,
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            data_parallel_size=config.data_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enforce_eager=config.enforce_eager,
        )
    raise ValueError(f"--engine {config.engine!r} is not available")


def create_app(config: ServiceConfig, engine: TeacherEngine | None = None) -> FastAPI:
    """The service; pass ``engine`` to serve an already constructed backend (tests, benchmarks)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine or build_engine(config)
        started = time.perf_counter()
        await eng.start()
        logger.info(
            "engine %s ready in %.1fs, serving %r",
            eng.engine_name,
            time.perf_counter() - started,
            eng.served_model_name,
        )
        app.state.engine = eng
        app.state.created = int(time.time())
        try:
            yield
        finally:
            await eng.close()

    app = FastAPI(title="GKD teacher service", version="0.1.0", lifespan=lifespan)
    app.state.config = config
    install_error_handlers(app)
    app.include_router(router)
    return app
