"""A teacher behind vLLM's OpenAI-compatible ``/v1/completions`` with ``prompt_logprobs``.

vLLM answers per sequence ``prompt_logprobs = [null, {"<id>": {"logprob", "rank",
"decoded_token"}}, ...]``: entry j+1 is our row j (:func:`shared.alignment.vllm_entry_for_row`).
An entry holds the top-k tokens and the actual next token, listed first; it has k+1
keys when the actual token is outside the top-k. Entries are placed by their ``rank``
(rank r goes to column r-1), so no per-entry sorting is needed; the first key gives
the target log-prob and is checked against the token we sent. JSON has no -inf:
vLLM sends -9999.0. Stock vLLM refuses k above its ``--max-logprobs`` (default 20)
with HTTP 400, which the handshake turns into a message naming ``--top_k``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch

from shared.alignment import num_rows, row_offsets, vllm_entry_for_row
from shared.codec import TopkFrame
from shared.protocol import LogprobDtype
from student_trainer.teacher.base import HttpTeacher
from student_trainer.teacher.errors import TeacherMismatchError, TeacherProtocolError, TeacherRequestError

logger = logging.getLogger(__name__)

VLLM_NEG_INF = -9999.0
"""What vLLM writes for -inf in JSON."""


@dataclass(frozen=True)
class VllmInfo:
    model: str
    max_model_len: int | None


def parse_prompt_logprobs(
    body: bytes,
    sequences: Sequence[Sequence[int]],
    first_rows: Sequence[int],
    top_k: int,
    vocab_size: int | None = None,
) -> tuple[TopkFrame, np.ndarray]:
    """A frame (ids, log-probs, offsets) and the target log-probs [N] from a /v1/completions answer."""
    try:
        choices = orjson.loads(body)["choices"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise TeacherProtocolError(f"vLLM answer is not a completions response: {exc!r}") from exc
    by_index: list[Any] = [None] * len(sequences)
    for choice in choices:
        i = choice.get("index")
        if not isinstance(i, int) or not 0 <= i < len(sequences) or by_index[i] is not None:
            raise TeacherProtocolError(f"vLLM answered choice index {i!r} for {len(sequences)} prompts")
        by_index[i] = choice
    offsets = row_offsets([len(s) for s in sequences], first_rows)
    n = int(offsets[-1])
    ids = np.full((n, top_k), -1, dtype=np.int64)
    lps = np.empty((n, top_k), dtype=np.float32)
    target = np.empty(n, dtype=np.float32)
    row = 0
    for b, (seq, first) in enumerate(zip(sequences, first_rows, strict=True)):
        choice = by_index[b]
        if choice is None:
            raise TeacherProtocolError(f"vLLM answered no choice for prompt {b}")
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(seq):
            got = len(entries) if isinstance(entries, list) else entries
            raise TeacherProtocolError(f"prompt {b}: {got} prompt_logprobs entries for {len(seq)} tokens")
        for j in range(first, num_rows(len(seq))):
            entry = entries[vllm_entry_for_row(j)]
            items = iter(entry.items())
            actual_key, actual = next(items)
            if int(actual_key) != seq[j + 1]:
                raise TeacherProtocolError(
                    f"prompt {b} row {j}: first entry is token {actual_key}, the sequence has {seq[j + 1]}"
                )
            target[row] = actual["logprob"]
            if len(entry) == top_k:  # the actual token is one of the top-k: place it too
                items = iter(entry.items())
            elif len(entry) != top_k + 1:
                raise TeacherProtocolError(f"prompt {b} row {j}: {len(entry)} entries for k={top_k}")
            for key, value in items:
                rank = value["rank"]
                if not 1 <= rank <= top_k:
                    raise TeacherProtocolError(f"prompt {b} row {j}: top-k entry with rank {rank}")
                ids[row, rank - 1] = int(key)
                lps[row, rank - 1] = value["logprob"]
            row += 1
    if (ids < 0).any():
        raise TeacherProtocolError("vLLM answer leaves top-k ranks unfilled (duplicate or missing ranks)")
    if vocab_size is not None and n and int(ids.max()) >= vocab_size:
        raise TeacherProtocolError(f"vLLM returned token id {int(ids.max())} outside the vocabulary of {vocab_size}")
    lps[lps <= VLLM_NEG_INF] = -np.inf
    target[target <= VLLM_NEG_INF] = -np.inf
    frame = TopkFrame(
        token_ids=torch.from_numpy(ids.astype(np.int32)),
        logprobs=torch.from_numpy(lps),
        row_offsets=offsets,
        first_rows=torch.tensor(list(first_rows), dtype=torch.int64),
    )
    frame.validate()
    return frame, target


class VllmTeacherClient(HttpTeacher):
    """Top-k rows from any server speaking vLLM's /v1/completions with prompt_logprobs."""

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
        logprobs_dtype: LogprobDtype = "float32",
        return_target_logprobs: bool = False,
        return_tail_logmass: bool = False,
    ) -> TopkFrame:
        """Rows ``first_rows[b]..`` of each sequence; the tail mass is left to the loss (from the top-k)."""
        model = await self.model_name()
        firsts = [0] * len(sequences) if first_rows is None else [int(f) for f in first_rows]
        body = {
            "model": model,
            "prompt": [list(map(int, s)) for s in sequences],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": top_k,
        }
        resp = await self._request(
            "POST", "/v1/completions", content=orjson.dumps(body), headers={"content-type": "application/json"}
        )
        frame, target = parse_prompt_logprobs(resp.content, sequences, firsts, top_k, self._vocab_size)
        if return_target_logprobs:
            frame.target_logprobs = torch.from_numpy(target)
        frame.metadata = {"model": model}
        return frame
