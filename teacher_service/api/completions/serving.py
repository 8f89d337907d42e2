"""`/v1/completions` with `prompt_logprobs` in vLLM's JSON shape, so `vllm serve` clients work unchanged.

This teacher scores prompts; it generates no tokens (``max_tokens`` above 1 is refused). The
``prompt_logprobs`` entries are built by :func:`shared.vllm_logprobs.prompt_logprobs_entries`, the
module that also reads them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from shared.codec import TopkFrame
from shared.vllm_logprobs import prompt_logprobs_entries
from teacher_service.api.completions.protocol import CompletionRequest, TokenizeRequest
from teacher_service.api.serving_base import ServingBase
from teacher_service.engines.base import ScoreJob, TeacherEngine
from teacher_service.errors import ServiceError


def _prompts_as_ids(prompt: Any, engine: TeacherEngine) -> list[list[int]]:
    """The prompt(s) as token-id lists; text goes through the served tokenizer, as `vllm serve` does."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        if engine.tokenizer is None:
            raise ServiceError(400, "this engine takes token-id prompts only", "prompt")
        return [engine.tokenizer(t).input_ids for t in texts]
    if not prompt:
        raise ServiceError(400, "prompt is empty", "prompt")
    return [prompt] if isinstance(prompt[0], int) else prompt


def _decoder(engine: TeacherEngine) -> Callable[[int], str | None]:
    """Token id -> text, cached per request: a prompt repeats few distinct ids across its k entries."""
    tok = engine.tokenizer

    @lru_cache(maxsize=65536)
    def decode(token_id: int) -> str | None:
        return None if tok is None else tok.decode([token_id])

    return decode


def _entries(
    frame: TopkFrame, b: int, prompt: list[int], k: int, decode: Callable[[int], str | None]
) -> list[dict[str, dict[str, Any]] | None]:
    """Sequence ``b`` of the frame as vLLM's ``prompt_logprobs`` (its first ``k`` columns; k may be 0)."""
    rows = frame.rows(b)
    if frame.target_logprobs is None:
        raise RuntimeError("the scorer returned no target log-probs for a completions job")
    ranks = None if frame.target_ranks is None else frame.target_ranks[rows]
    return prompt_logprobs_entries(
        prompt, frame.token_ids[rows, :k], frame.logprobs[rows, :k], frame.target_logprobs[rows], ranks, decode
    )


class CompletionServing(ServingBase):
    """The vLLM-compatible endpoints: scoring through /v1/completions, and vLLM's /tokenize."""

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize answer, so a client checks this teacher's tokenizer as it checks vLLM's."""
        self.check_model_name(req.model)
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ServiceError(400, "this engine has no tokenizer loaded", "prompt")
        tokens = tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        return {"count": len(tokens), "max_model_len": self.engine.max_model_len, "tokens": tokens, "token_strs": None}

    def _prompt_logprobs_k(self, req: CompletionRequest) -> int | None:
        """The k of the request (-1: the whole vocabulary, as vLLM reads it), refused past what we serve."""
        self.check_model_name(req.model)
        if req.stream:
            raise ServiceError(400, "streaming is not supported by this scoring teacher", "stream")
        if req.n != 1:
            raise ServiceError(400, "only n=1 is supported by this scoring teacher", "n")
        if req.max_tokens is not None and req.max_tokens > 1:
            raise ServiceError(
                400, "this teacher scores prompts and generates no tokens: use max_tokens 0 or 1", "max_tokens"
            )
        if req.prompt_logprobs is not None and req.temperature not in (None, 0.0, 1.0):
            # Stock vLLM (0.32, every logprobs_mode) computes prompt log-probs from the raw logits whatever the
            # request's temperature, which only shapes sampling: answering would hand back temperature 1 rows
            # to a client that asked for others. 0 (greedy) and 1 are what scoring clients send; they get raw rows.
            raise ServiceError(
                400,
                f"temperature={req.temperature} with prompt_logprobs: prompt log-probs are computed at temperature 1 "
                "(as vLLM does; temperature only shapes sampling), so they would not be at the temperature asked "
                "for. Send temperature 0 or 1, or use /v1/topk_logprobs with its temperature field",
                "temperature",
            )
        vocab = self.engine.vocab_size
        k = vocab if req.prompt_logprobs == -1 else req.prompt_logprobs
        allowed = min(self.config.max_top_k, vocab)
        if k is not None and k > allowed:
            raise ServiceError(
                400,
                f"Requested prompt logprobs of {k}, which is greater than max allowed: {allowed}",
                "prompt_logprobs",
            )
        return k

    async def create_completion(self, req: CompletionRequest) -> dict[str, Any]:
        """A vLLM completions answer: per prompt, ``prompt_logprobs`` (or None when not asked for), no text."""
        k = self._prompt_logprobs_k(req)
        prompts = _prompts_as_ids(req.prompt, self.engine)
        self.validate_sequences(prompts, param="prompt", min_len=1)
        scored = [i for i, p in enumerate(prompts) if len(p) >= 2]
        frame = None
        if k is not None and scored:
            # k = 0 still scores: each position then carries the actual token's log-prob and rank alone
            job = ScoreJob.from_first_rows(
                sequences=[prompts[i] for i in scored],
                first_rows=[0] * len(scored),
                top_k=max(k, 1),
                want_target_logprobs=True,
            )
            frame = await self.score(job)
        decode = _decoder(self.engine)
        position = {i: b for b, i in enumerate(scored)}
        choices = []
        for i, prompt in enumerate(prompts):
            plp = None
            if k is not None:
                plp = [None] if frame is None or i not in position else _entries(frame, position[i], prompt, k, decode)
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
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.engine.served_model_name,
            "choices": choices,
            "usage": {"prompt_tokens": n_tokens, "completion_tokens": 0, "total_tokens": n_tokens},
        }
