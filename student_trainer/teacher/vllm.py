"""A teacher behind vLLM's OpenAI-compatible ``/v1/completions`` with ``prompt_logprobs``.

vLLM publishes no tokenizer fingerprint: the handshake compares its ``/tokenize`` of a probe text
with the student's ids, then probes ``top_k`` (stock vLLM refuses k above its ``--max-logprobs``,
default 20, with HTTP 400, turned here into a message naming ``--top_k``). The answer's layout is
read by :mod:`shared.vllm_logprobs`, which also writes it on the teacher's side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch

from shared.alignment import tokens_for_spans
from shared.codec import TopkFrame
from shared.protocol import LogprobDtype, TopkRequest
from shared.vllm_logprobs import PromptLogprobsError, parse_completions_json
from student_trainer.teacher.base import HttpTeacher
from student_trainer.teacher.errors import TeacherMismatchError, TeacherProtocolError, TeacherRequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmInfo:
    """The handshake a vLLM server offers: its served model (first of /v1/models) and context length."""

    model: str
    max_model_len: int | None


def parse_prompt_logprobs(
    body: bytes,
    sequences: Sequence[Sequence[int]],
    first_rows: Sequence[int],
    top_k: int,
    vocab_size: int | None = None,
) -> tuple[TopkFrame, np.ndarray]:
    """A frame and the target log-probs [N] from a /v1/completions answer; any layout fault is a protocol error."""
    try:
        return parse_completions_json(body, sequences, first_rows, top_k, vocab_size)
    except PromptLogprobsError as exc:
        raise TeacherProtocolError(str(exc)) from exc


class VllmTeacherClient(HttpTeacher):
    """Top-k rows from any server speaking vLLM's /v1/completions with prompt_logprobs."""

    READY_PATH = "/health"  # stock vLLM has no /ready; /health answers 200 once the engine runs

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._info: VllmInfo | None = None
        self._vocab_size: int | None = None

    async def info(self) -> VllmInfo:
        """The served model (first of /v1/models), fetched once per client instance."""
        if self._info is None:
            resp = await self._request("GET", "/v1/models")
            try:
                card = orjson.loads(resp.content)["data"][0]
                self._info = VllmInfo(model=str(card["id"]), max_model_len=card.get("max_model_len"))
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                raise TeacherProtocolError(f"/v1/models answer names no model: {exc!r}") from exc
            logger.info("vLLM teacher %s serves %r", self.base_url, self._info.model)
        return self._info

    async def model_name(self) -> str:
        return (await self.info()).model

    async def check_compatible(
        self, vocab_size: int, tokenizer_fingerprint: str, top_k: int, probe: tuple[str, list[int]] | None = None
    ) -> VllmInfo:
        """vLLM publishes no tokenizer fingerprint: compare its tokenization of ``probe``, then probe ``top_k``."""
        info = await self.info()
        if probe is None:
            raise ValueError("a vLLM teacher needs a tokenizer probe (text, student token ids)")
        text, student_ids = probe
        resp = await self._request(
            "POST", "/tokenize", json={"model": info.model, "prompt": text, "add_special_tokens": False}
        )
        teacher_ids = orjson.loads(resp.content).get("tokens")
        if teacher_ids != student_ids:
            raise TeacherMismatchError(
                f"tokenizer mismatch: teacher {info.model!r} tokenizes {text!r} as {teacher_ids}, "
                f"the student as {student_ids}; teacher and student must share a tokenizer"
            )
        self._vocab_size = vocab_size
        try:
            await self.topk_logprobs([student_ids[:2] if len(student_ids) >= 2 else [0, 0]], top_k)
        except TeacherRequestError as exc:
            if exc.status == 400:
                raise TeacherMismatchError(
                    f"--top_k {top_k} is refused by the vLLM teacher ({exc}); lower --top_k or start vLLM "
                    f"with --max-logprobs {top_k}"
                ) from exc
            raise
        return info

    async def topk_logprobs(
        self,
        sequences: Sequence[Sequence[int]],
        top_k: int,
        first_rows: Sequence[int] | None = None,
        *,
        row_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
        logprobs_dtype: LogprobDtype = "float32",
        return_target_logprobs: bool = False,
        return_tail_logmass: bool = False,
    ) -> TopkFrame:
        """Rows ``first_rows[b]..``, or the rows of ``row_spans[b]`` (the frame then carries the spans, as the
        teacher service's does); the tail mass is left to the loss (from the top-k).

        vLLM answers prompt log-probs of whole prompts: each sequence is sent up to its last span's last label
        (none without spans), its rows are read from its first span's start, and the span rows kept.
        """
        model = await self.model_name()
        req = TopkRequest(  # checks the rows asked for as the teacher service would
            sequences=[[int(t) for t in s] for s in sequences],
            top_k=top_k,
            first_rows=None if first_rows is None else [int(f) for f in first_rows],
            row_spans=None if row_spans is None else [[[int(a), int(b)] for a, b in spans] for spans in row_spans],
        )
        spans = req.resolved_row_spans()
        scored = [b for b, sp in enumerate(spans) if sp]
        prompts = [req.sequences[b][: tokens_for_spans(spans[b])] for b in scored]
        block, target = await self._prompt_rows(model, prompts, [spans[b][0][0] for b in scored], top_k)
        if return_target_logprobs:
            block.target_logprobs = torch.from_numpy(target)
        try:
            frame = TopkFrame.from_blocks(block, spans, [len(s) for s in req.sequences])
        except ValueError as exc:
            raise TeacherProtocolError(f"vLLM answer does not cover the requested rows: {exc}") from exc
        frame.metadata = {"model": model}
        return frame if row_spans is not None else frame.without_spans()

    async def _prompt_rows(
        self, model: str, prompts: list[list[int]], firsts: list[int], top_k: int
    ) -> tuple[TopkFrame, np.ndarray]:
        """Rows ``firsts[i]..`` of each prompt from one /v1/completions request (none sent for no prompts)."""
        if not prompts:
            empty = TopkFrame(
                torch.empty(0, top_k, dtype=torch.int32),
                torch.empty(0, top_k),
                torch.zeros(1, dtype=torch.int64),
                torch.empty(0, dtype=torch.int64),
            )
            return empty, np.empty(0, dtype=np.float32)
        body = {"model": model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k}
        resp = await self._request(
            "POST", "/v1/completions", content=orjson.dumps(body), headers={"content-type": "application/json"}
        )
        return parse_prompt_logprobs(resp.content, prompts, firsts, top_k, self._vocab_size)
