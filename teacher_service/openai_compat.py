"""`POST /v1/completions` with `prompt_logprobs`, in vLLM's JSON shape, so `vllm serve` clients work unchanged.

This teacher scores prompts; it generates no tokens (``max_tokens`` above 1 is refused).
Each position p >= 1 of ``prompt_logprobs`` holds the actual prompt token first (with its
vocabulary rank), then the top-k by rank; a top-k entry equal to the actual token is not
repeated, so a position has k or k+1 entries, as in vLLM. ``-inf`` is sent as -9999.0.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from shared.alignment import vllm_entry_for_row
from shared.codec import TopkFrame
from teacher_service.body import parse_json_body
from teacher_service.deps import Config, Engine, Metrics, ScorerDep, admitted
from teacher_service.engines.base import ScoreJob, TeacherEngine
from teacher_service.errors import ServiceError
from teacher_service.routes import JSON_NEG_INF, check_model_name, validate_sequences

router = APIRouter()


class CompletionRequest(BaseModel):
    """The subset of the OpenAI/vLLM completions request a scoring teacher needs; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="Text or token ids, one or many.")
    max_tokens: int | None = Field(default=None, ge=0)
    prompt_logprobs: int | None = Field(default=None, ge=-1)
    n: int = 1
    stream: bool = False


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize` request (completion form), so a client can check the tokenizer the way it checks vLLM."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


@router.post("/tokenize")
async def tokenize(request: Request, engine: Engine, config: Config) -> dict[str, Any]:
    req = await parse_json_body(request, TokenizeRequest, config.max_body_bytes)
    check_model_name(req.model, engine)
    if engine.tokenizer is None:
        raise ServiceError(400, "this engine has no tokenizer loaded", "prompt")
    tokens = engine.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
    return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens, "token_strs": None}


def _prompts_as_ids(prompt: Any, engine: TeacherEngine) -> list[list[int]]:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        if engine.tokenizer is None:
            raise ServiceError(400, "this engine takes token-id prompts only", "prompt")
        return [engine.tokenizer(t).input_ids for t in texts]
    if not prompt:
        raise ServiceError(400, "prompt is empty", "prompt")
    return [prompt] if isinstance(prompt[0], int) else prompt


def _decoder(engine: TeacherEngine) -> Callable[[int], str | None]:
    tok = engine.tokenizer

    @lru_cache(maxsize=65536)
    def decode(token_id: int) -> str | None:
        return None if tok is None else tok.decode([token_id])

    return decode


def _position_entries(
    frame: TopkFrame, rows: slice, seq: list[int], k: int, decode: Callable[[int], str | None]
) -> list[dict[str, dict] | None]:
    """vLLM's entries per position: the actual token first, then the top-k (``k`` may be 0: actual token only)."""
    ids = frame.token_ids[rows, :k].tolist()
    lps = frame.logprobs[rows, :k].float().clamp_min(JSON_NEG_INF).tolist()
    t_lps = frame.target_logprobs[rows].float().clamp_min(JSON_NEG_INF).tolist()  # type: ignore[index]
    t_ranks = frame.target_ranks[rows].tolist() if frame.target_ranks is not None else [None] * len(ids)
    out: list[dict[str, dict] | None] = [None]
    for j, (row_ids, row_lps) in enumerate(zip(ids, lps, strict=True)):
        actual = seq[vllm_entry_for_row(j)]
        entry = {str(actual): {"logprob": t_lps[j], "rank": t_ranks[j], "decoded_token": decode(actual)}}
        for rank, (tid, lp) in enumerate(zip(row_ids, row_lps, strict=True), start=1):
            if tid != actual:
                entry[str(tid)] = {"logprob": lp, "rank": rank, "decoded_token": decode(tid)}
        out.append(entry)
    return out


@router.post("/v1/completions", dependencies=[Depends(admitted)])
async def completions(
    request: Request, engine: Engine, scorer: ScorerDep, config: Config, metrics: Metrics
) -> Response:
    req = await parse_json_body(request, CompletionRequest, config.max_body_bytes)
    check_model_name(req.model, engine)
    if req.stream:
        raise ServiceError(400, "streaming is not supported by this scoring teacher", "stream")
    if req.n != 1:
        raise ServiceError(400, "only n=1 is supported by this scoring teacher", "n")
    if req.max_tokens is not None and req.max_tokens > 1:
        raise ServiceError(
            400, "this teacher scores prompts and generates no tokens: use max_tokens 0 or 1", "max_tokens"
        )
    k = engine.vocab_size if req.prompt_logprobs == -1 else req.prompt_logprobs
    allowed = min(config.max_top_k, engine.vocab_size)
    if k is not None and k > allowed:
        raise ServiceError(
            400, f"Requested prompt logprobs of {k}, which is greater than max allowed: {allowed}", "prompt_logprobs"
        )
    prompts = _prompts_as_ids(req.prompt, engine)
    validate_sequences(prompts, engine, config, param="prompt", min_len=1)
    scored = [i for i, p in enumerate(prompts) if len(p) >= 2]
    frame = None
    if k is not None and scored:
        # k = 0 still scores: each position then carries the actual token's log-prob and rank alone
        job = ScoreJob(
            sequences=[prompts[i] for i in scored],
            first_rows=[0] * len(scored),
            top_k=max(k, 1),
            want_target_logprobs=True,
        )
        frame = await scorer.score(job)
        metrics.rows.inc(int(frame.token_ids.shape[0]))
        metrics.tokens.inc(job.num_tokens)
    decode = _decoder(engine)
    position = {i: b for b, i in enumerate(scored)}
    choices = []
    for i, prompt in enumerate(prompts):
        plp = None
        if k is not None:
            plp = [None] if i not in position else _position_entries(frame, frame.rows(position[i]), prompt, k, decode)  # type: ignore[union-attr]
        choices.append(
            {
                "index": i,
                "text": "",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": plp,
            }
        )
    n_tokens = sum(len(p) for p in prompts)
    body = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": engine.served_model_name,
        "choices": choices,
        "usage": {"prompt_tokens": n_tokens, "completion_tokens": 0, "total_tokens": n_tokens},
    }
    return Response(orjson.dumps(body), media_type="application/json")
