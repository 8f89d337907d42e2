"""HTTP routes: thin adapters between the wire schemas and the engine."""

from __future__ import annotations

import orjson
import torch
from fastapi import APIRouter, Depends, Request, Response

from shared.codec import LOGPROB_DTYPES, TopkFrame, encode_frame
from shared.protocol import (
    FORMAT_VERSION,
    TOPK_MEDIA_TYPE,
    ModelCard,
    ModelList,
    RequestLimits,
    SequenceTopk,
    TeacherInfo,
    TopkJsonResponse,
    TopkRequest,
)
from teacher_service.body import parse_json_body
from teacher_service.config import ServiceConfig
from teacher_service.deps import Config, Engine, Metrics, ScorerDep, admitted
from teacher_service.engines.base import ScoreJob, TeacherEngine
from teacher_service.errors import ServiceError

router = APIRouter()

JSON_NEG_INF = -9999.0
"""JSON has no -inf; vLLM sends -9999.0 in its place, and so do we (binary frames keep -inf)."""


@router.get("/v1/models")
async def list_models(engine: Engine, request: Request) -> ModelList:
    card = ModelCard(
        id=engine.served_model_name,
        created=request.app.state.created,
        root=getattr(engine, "model_dir", None),
        max_model_len=engine.max_model_len or None,
    )
    return ModelList(data=[card])


@router.get("/v1/info")
async def info(engine: Engine, config: Config) -> TeacherInfo:
    return TeacherInfo(
        model=engine.served_model_name,
        vocab_size=engine.vocab_size,
        tokenizer_fingerprint=engine.tokenizer_fingerprint,
        max_top_k=config.max_top_k,
        limits=RequestLimits(
            max_top_k=config.max_top_k,
            max_sequences=config.max_sequences,
            max_tokens=config.max_tokens,
            max_body_bytes=config.max_body_bytes,
        ),
        engine=engine.engine_name,
    )


def check_model_name(requested: str | None, engine: TeacherEngine) -> None:
    if requested is not None and requested != engine.served_model_name:
        raise ServiceError(
            404, f"The model `{requested}` does not exist; this teacher serves `{engine.served_model_name}`.", "model"
        )


def validate_sequences(
    sequences: list[list[int]], engine: TeacherEngine, config: ServiceConfig, param: str = "sequences", min_len: int = 2
) -> None:
    """Count, size and token-id checks shared by every scoring route."""
    if len(sequences) > config.max_sequences:
        raise ServiceError(413, f"{len(sequences)} sequences exceed the limit of {config.max_sequences}", param)
    total = sum(len(s) for s in sequences)
    if total > config.max_tokens:
        raise ServiceError(413, f"{total} tokens exceed the limit of {config.max_tokens}", param)
    vocab, max_len = engine.vocab_size, engine.max_model_len
    for i, seq in enumerate(sequences):
        if len(seq) < min_len:
            raise ServiceError(
                400, f"{param}[{i}] has {len(seq)} tokens; at least {min_len} are needed", f"{param}[{i}]"
            )
        if max_len and len(seq) > max_len:
            raise ServiceError(
                400, f"{param}[{i}] has {len(seq)} tokens, more than the model's {max_len}", f"{param}[{i}]"
            )
        lo, hi = min(seq), max(seq)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ServiceError(400, f"{param}[{i}] holds token id {bad} outside [0, {vocab})", f"{param}[{i}]")


def check_top_k(k: int, engine: TeacherEngine, config: ServiceConfig, param: str) -> None:
    if k > config.max_top_k:
        raise ServiceError(400, f"{param}={k} exceeds this teacher's maximum of {config.max_top_k}", param)
    if k > engine.vocab_size:
        raise ServiceError(400, f"{param}={k} exceeds the vocabulary size {engine.vocab_size}", param)


def validate_against_limits(req: TopkRequest, engine: TeacherEngine, config: ServiceConfig) -> None:
    """Checks that need the served model or the service limits (the schema checks the rest)."""
    check_model_name(req.model, engine)
    check_top_k(req.top_k, engine, config, "top_k")
    validate_sequences(req.sequences, engine, config)


def wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and TOPK_MEDIA_TYPE not in accept


def _json_floats(t: torch.Tensor) -> list:
    return t.float().clamp_min(JSON_NEG_INF).tolist()


def frame_to_json(frame: TopkFrame, model: str, vocab_size: int) -> TopkJsonResponse:
    seqs = []
    for b in range(frame.num_sequences):
        rows = frame.rows(b)
        seqs.append(
            SequenceTopk(
                first_row=int(frame.first_rows[b]),
                token_ids=frame.token_ids[rows].tolist(),
                logprobs=_json_floats(frame.logprobs[rows]),
                target_logprobs=None if frame.target_logprobs is None else _json_floats(frame.target_logprobs[rows]),
                tail_logmass=None if frame.tail_logmass is None else _json_floats(frame.tail_logmass[rows]),
            )
        )
    return TopkJsonResponse(model=model, top_k=frame.top_k, vocab_size=vocab_size, sequences=seqs)


@router.post(
    "/v1/topk_logprobs",
    dependencies=[Depends(admitted)],
    responses={200: {"content": {TOPK_MEDIA_TYPE: {}, "application/json": {}}}},
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": TopkRequest.model_json_schema()}}}
    },
)
async def topk_logprobs(
    request: Request, engine: Engine, scorer: ScorerDep, config: Config, metrics: Metrics
) -> Response:
    """Top-k teacher log-probs for every requested row of every sequence (binary frame by default)."""
    req = await parse_json_body(request, TopkRequest, config.max_body_bytes)
    validate_against_limits(req, engine, config)
    job = ScoreJob(
        sequences=req.sequences,
        first_rows=req.resolved_first_rows(),
        top_k=req.top_k,
        want_target_logprobs=req.return_target_logprobs,
        want_tail_logmass=req.return_tail_logmass,
    )
    frame = await scorer.score(job)
    metrics.rows.inc(int(frame.token_ids.shape[0]))
    metrics.tokens.inc(job.num_tokens)
    if wants_json(request):
        body = frame_to_json(frame, engine.served_model_name, engine.vocab_size)
        return Response(orjson.dumps(body.model_dump(exclude_none=True)), media_type="application/json")
    frame.target_ranks = None  # used by the vLLM-compatible JSON answer only
    frame.logprobs = frame.logprobs.to(LOGPROB_DTYPES[req.logprobs_dtype])
    frame.metadata = {
        "model": engine.served_model_name,
        "vocab_size": str(engine.vocab_size),
        "top_k": str(req.top_k),
        "format_version": str(FORMAT_VERSION),
    }
    return Response(encode_frame(frame), media_type=TOPK_MEDIA_TYPE)
