"""Application factory: the engine loads in the background after the server starts listening.

Liveness (`/health`) answers at once; readiness (`/ready`) and the /v1 routes wait
for the engine to be loaded and warmed up. Resources live on ``app.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from teacher_service import ops
from teacher_service.api import API_ROUTERS
from teacher_service.config import ServiceConfig
from teacher_service.deps import require_api_key
from teacher_service.disconnect import CancelOnDisconnect
from teacher_service.engines.base import TeacherEngine
from teacher_service.errors import install_error_handlers
from teacher_service.metrics import ServiceMetrics
from teacher_service.middleware import RequestContextMiddleware
from teacher_service.scheduling import Admission, DirectScorer, MicroBatcher

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
            kv_cache_memory_bytes=config.kv_cache_memory_bytes,
            max_model_len=config.max_model_len,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enforce_eager=config.enforce_eager,
        )
    raise ValueError(f"--engine {config.engine!r} is not available")


async def _load_engine(app: FastAPI, engine: TeacherEngine, config: ServiceConfig) -> None:
    started = time.perf_counter()
    try:
        await engine.start()
    except Exception:
        # Not ready, never will be: stop the process so that the supervisor (k8s, compose) restarts it.
        logger.exception("engine %s failed to start; shutting down", engine.engine_name)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if engine.batches_internally:
        app.state.scorer = DirectScorer(engine, app.state.metrics)
    else:
        batcher = MicroBatcher(
            engine, config.max_batch_tokens, config.batch_wait_ms / 1000, config.max_batch_requests, app.state.metrics
        )
        batcher.start()
        app.state.scorer = batcher
    app.state.ready = True
    app.state.metrics.ready.set(1)
    logger.info(
        "engine %s ready in %.1fs, serving %r",
        engine.engine_name,
        time.perf_counter() - started,
        engine.served_model_name,
    )


def create_app(config: ServiceConfig, engine: TeacherEngine | None = None) -> FastAPI:
    """The service; pass ``engine`` to serve an already constructed backend (tests, benchmarks)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine or build_engine(config)
        app.state.engine = eng
        app.state.created = int(time.time())
        loader = asyncio.create_task(_load_engine(app, eng, config))
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if app.state.scorer is not None:
                await app.state.scorer.close()
            await eng.close()

    app = FastAPI(title="GKD teacher service", version="0.1.0", lifespan=lifespan)
    app.state.config = config
    app.state.api_key = config.api_key()
    app.state.metrics = ServiceMetrics()
    app.state.admission = Admission(config.max_queue)
    app.state.ready = False
    app.state.scorer = None
    install_error_handlers(app)
    app.include_router(ops.router)
    for router in API_ROUTERS:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    app.add_middleware(CancelOnDisconnect)  # inside the request context, which logs and counts what it cancels
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    return app
