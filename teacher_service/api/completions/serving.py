"""`/v1/completions` in vLLM's JSON shape, so `vllm serve` clients work unchanged: scoring with
`prompt_logprobs`, and generation with `max_tokens` > 1 (teacher completions, e.g. for sequence-level KD).

``max_tokens`` 0 or 1 scores only: no token is generated (the token vLLM would sample is of no use to a
scoring client, and costs a forward). Absent, it is vLLM's default of 16. The ``prompt_logprobs`` entries
are built by :func:`shared.vllm_logprobs.prompt_logprobs_entries`, the module that also reads them.
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
from teacher_service.engines.generation import Completion, GenerateJob
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
            raise ServiceError(400, "streaming is not supported by this teacher", "stream")
        unsupported = req.unsupported()
        if unsupported is not None:
            raise ServiceError(400, f"{unsupported} is not supported by this teacher", unsupported)
        if req.n != 1 and req.max_new_tokens <= 1:
            raise ServiceError(400, "n > 1 needs generation (max_tokens > 1); scoring answers one choice", "n")
        if req.prompt_logprobs is not None and req.temperature not in (None, 0.0, 1.0):
            # Stock vLLM (0.32, every logprobs_mode) computes prompt log-probs from the raw logits whatever the
            # request's temperature, which only shapes sampling: answering would hand back temperature 1 rows
            # to a client that asked for others. 0 (greedy) and 1 are what scoring clients send; they get raw rows.
            raise ServiceError(
                400,
                f"temperature={req.temperature} with prompt_logprobs: prompt log-probs are computed at temperature 1 "
                "(as vLLM does; temperature only shapes sampling), so they would not be at the temperature asked "
                "for. Send temperature 0 or 1 (or generate without prompt_logprobs), or use /v1/topk_logprobs with "
                "its temperature field",
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

    def _generate_job(self, req: CompletionRequest, prompts: list[list[int]]) -> GenerateJob | None:
        """The generation the request asks for (None: ``max_tokens`` 0 or 1, scoring only), checked as vLLM does."""
        max_tokens = req.max_new_tokens
        if max_tokens <= 1:
            return None
        if not self.engine.can_generate:
            raise ServiceError(400, f"the {self.engine.engine_name} engine does not generate", "max_tokens")
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature == 0 and req.n > 1:
            raise ServiceError(400, f"n must be 1 when using greedy sampling (temperature 0), got {req.n}", "n")
        sequences = len(prompts) * req.n
        if sequences > self.config.max_sequences:
            raise ServiceError(
                400,
                f"{len(prompts)} prompts x n={req.n} = {sequences} completions exceed the limit of "
                f"{self.config.max_sequences}",
                "n",
            )
        limit = self.engine.max_total_tokens
        for i, prompt in enumerate(prompts):
            if limit and len(prompt) + max_tokens > limit:
                raise ServiceError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{len(prompt) + max_tokens} tokens ({len(prompt)} in prompt[{i}], {max_tokens} in the completion)",
                    "max_tokens",
                )
        total = sum(len(p) for p in prompts) + sequences * max_tokens
        if total > self.config.max_tokens:
            message = f"prompts plus n x max_tokens make {total} tokens, over the limit of {self.config.max_tokens}"
            raise ServiceError(413, message, "max_tokens")
        stops = req.stop_strings
        if any(not s for s in stops):
            raise ServiceError(400, "stop cannot contain an empty string", "stop")
        stop_ids = req.stop_token_ids or []
        bad = next((t for t in stop_ids if not 0 <= t < self.engine.vocab_size), None)
        if bad is not None:
            raise ServiceError(
                400, f"stop_token_ids holds {bad}, outside [0, {self.engine.vocab_size})", "stop_token_ids"
            )
        return GenerateJob(
            prompts=prompts,
            max_tokens=max_tokens,
            n=req.n,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),  # -1 and 0 both disable it, as in vLLM
            seed=req.seed,
            stop=tuple(stops),
            stop_token_ids=tuple(stop_ids),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
        )

    async def generate(self, job: GenerateJob) -> list[list[Completion]]:
        """The engine's completions, counted in the generated-tokens metric."""
        completions = await self.engine.generate(job)
        self.metrics.generated_tokens.inc(sum(len(c.token_ids) for cs in completions for c in cs))
        return completions

    async def create_completion(self, req: CompletionRequest) -> dict[str, Any]:
        """A vLLM completions answer: per prompt, its ``n`` completions (none when only scoring), each with the
        prompt's ``prompt_logprobs`` (None when not asked for) and, with ``return_token_ids``, the token ids."""
        k = self._prompt_logprobs_k(req)
        prompts = _prompts_as_ids(req.prompt, self.engine)
        self.validate_sequences(prompts, param="prompt", min_len=1)
        gen_job = self._generate_job(req, prompts)
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
        generated = None if gen_job is None else await self.generate(gen_job)
        decode = _decoder(self.engine)
        position = {i: b for b, i in enumerate(scored)}
        with_ids = bool(req.return_token_ids)
        choices = []
        for i, prompt in enumerate(prompts):
            plp = None
            if k is not None:
                plp = [None] if frame is None or i not in position else _entries(frame, position[i], prompt, k, decode)
            samples = [Completion([], "", "length")] if generated is None else generated[i]
            for sample in samples:
                choices.append(
                    {
                        "index": len(choices),
                        "text": sample.text,
                        "logprobs": None,
                        "finish_reason": sample.finish_reason,
                        "stop_reason": sample.stop_reason,
                        "token_ids": sample.token_ids if with_ids else None,
                        "prompt_logprobs": plp,
                        "prompt_token_ids": prompt if with_ids else None,
                    }
                )
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = 0 if generated is None else sum(len(c.token_ids) for cs in generated for c in cs)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.engine.served_model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
