"""The embedded default engine: a Hugging Face transformers causal LM, CPU or GPU.

It runs the model body once per padded chunk of sequences, gathers the hidden states of the requested rows,
and applies the output layer to those alone, in row chunks fused with top-k, the normalizer, the target
log-prob and the exact tail (:mod:`teacher_service.engines.head`): the ``[B, T, V]`` logits are never built.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from shared.alignment import RowSpan, pad_sequences, span_positions, tokens_for_spans
from shared.codec import TopkFrame
from teacher_service.engines.base import ModelDirEngine, ScoreJob
from teacher_service.engines.generation import Completion, GenerateJob
from teacher_service.engines.head import (
    OutputHead,
    RowTopk,
    check_head,
    chunk_rows,
    model_body,
    output_head,
    topk_from_blocks,
    topk_rows,
)
from teacher_service.engines.hf_generate import generate_sync

__all__ = ["HFEngine", "RowTopk", "topk_rows"]

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine(ModelDirEngine):
    """Batched forward passes, run off the event loop, one at a time (the model is not re-entrant).

    ``load`` refuses a model whose output layer it cannot reproduce from hidden states (see
    :func:`teacher_service.engines.head.check_head`).
    """

    engine_name = "transformers"
    applies_temperature = True
    can_generate = True

    def __init__(
        self,
        model_dir: str | Path,
        served_model_name: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        max_batch_tokens: int = 8192,
        logits_chunk_rows: int | None = None,
    ) -> None:
        super().__init__(model_dir, served_model_name)
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_TORCH_DTYPES)}")
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self.logits_chunk_rows = logits_chunk_rows
        """Rows per block of logits; None: :func:`~teacher_service.engines.head.chunk_rows` of the vocabulary."""
        self._lock = threading.Lock()
        self._model: torch.nn.Module | None = None
        self._body: torch.nn.Module | None = None
        self._head: OutputHead | None = None

    def load(self) -> None:
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=_TORCH_DTYPES[self.dtype])
        model.to(self.device).eval()
        self.use_model(model)
        logger.info(
            "loaded %s (%s, %s, %s) from %s",
            self.served_model_name,
            type(model).__name__,
            self._head.describe() if self._head else "",
            model.dtype,
            self.model_dir,
        )

    def use_model(self, model: torch.nn.Module) -> None:
        """Serve ``model`` (already on the device, in eval mode): find its body and head and check them on a
        probe against its own forward pass; :class:`~teacher_service.engines.head.UnsupportedHeadError` if
        they do not reproduce its log-probs."""
        body, head = model_body(model), output_head(model)
        probe = torch.arange(8, device=self.device).remainder(head.vocab_size).unsqueeze(0)
        check_head(model, body, head, probe)
        self._model, self._body, self._head = model, body, head
        self._vocab_size = head.vocab_size
        self._max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        warm = ScoreJob.from_first_rows(sequences=[[0, 1, 2, 3]], first_rows=[0], top_k=1)
        await self.score(warm)

    async def score(self, job: ScoreJob) -> TopkFrame:
        return await asyncio.to_thread(self.score_sync, job)

    def score_sync(self, job: ScoreJob) -> TopkFrame:
        """The rows of the job's spans, and only those: a sequence without spans is not run, the others only
        up to their last span's last label (later tokens change none of the rows), and top-k is taken at the
        span rows alone."""
        if self._model is None:
            raise RuntimeError("engine not loaded")
        scored = [b for b, spans in enumerate(job.row_spans) if spans]
        prefixes = [job.sequences[b][: tokens_for_spans(job.row_spans[b])] for b in scored]
        spans = [job.row_spans[b] for b in scored]
        parts: list[RowTopk] = []
        with self._lock, torch.inference_mode():
            for lo, hi in self._token_budget_chunks(prefixes):
                parts.append(self._score_chunk(prefixes[lo:hi], spans[lo:hi], job))
        rows = RowTopk.cat(parts, job.top_k, job.want_target_logprobs, job.want_tail_logmass)
        return TopkFrame.from_spans(
            rows.ids,
            rows.logprobs,
            job.row_spans,
            job.seq_lens,
            target_logprobs=rows.target_logprobs,
            tail_logmass=rows.tail_logmass,
            target_ranks=rows.target_ranks,
        )

    def _token_budget_chunks(self, sequences: list[list[int]]) -> list[tuple[int, int]]:
        """Split the batch so a padded forward stays under ``max_batch_tokens``."""
        if not sequences:
            return []
        chunks: list[tuple[int, int]] = []
        lo, longest = 0, 0
        for i, seq in enumerate(sequences):
            longest_if_added = max(longest, len(seq))
            if i > lo and longest_if_added * (i - lo + 1) > self.max_batch_tokens:
                chunks.append((lo, i))
                lo, longest_if_added = i, len(seq)
            longest = longest_if_added
        chunks.append((lo, len(sequences)))
        return chunks

    def _score_chunk(self, seqs: list[list[int]], spans: list[list[RowSpan]], job: ScoreJob) -> RowTopk:
        """Top-k at the span rows of one padded pass of the body, the head applied to those rows only."""
        assert self._body is not None and self._head is not None
        head = self._head
        input_ids, mask = pad_sequences(seqs, pad_id=0)  # any id would do: padded positions are masked
        hidden = self._body(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
        ).last_hidden_state
        b_idx, t_idx = span_positions(mask, spans)
        rows = hidden[b_idx.to(self.device), t_idx.to(self.device)]  # [N, D]: the only rows the head sees
        del hidden
        targets = input_ids[b_idx, t_idx + 1] if job.want_target_logprobs else None
        return topk_from_blocks(
            lambda sl: head.logits(rows[sl]),
            rows.shape[0],
            head.vocab_size,
            job.top_k,
            targets,
            job.want_tail_logmass,
            job.temperature,
            self.logits_chunk_rows or chunk_rows(head.vocab_size),
        )

    # --- generation

    async def generate(self, job: GenerateJob) -> list[list[Completion]]:
        """Off the event loop, like scoring; a cancelled call stops the worker at its next token."""
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self.generate_sync, job, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def generate_sync(self, job: GenerateJob, cancel: threading.Event | None = None) -> list[list[Completion]]:
        if self._model is None:
            raise RuntimeError("engine not loaded")
        with self._lock:
            return generate_sync(
                self._model, self.tokenizer, job, max_batch_tokens=self.max_batch_tokens, cancel=cancel
            )
