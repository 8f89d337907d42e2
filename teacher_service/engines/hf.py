"""The embedded default engine: a Hugging Face transformers causal LM, CPU or GPU."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from shared.alignment import RowSpan, pad_sequences, span_positions, tokens_for_spans
from shared.codec import TopkFrame
from teacher_service.engines.base import ModelDirEngine, ScoreJob
from teacher_service.engines.generation import Completion, GenerateJob
from teacher_service.engines.hf_generate import generate_sync

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RowTopk:
    """Per-row results of :func:`topk_rows`; extras are None unless asked for."""

    ids: torch.Tensor  # int32 [N, k]
    logprobs: torch.Tensor  # float32 [N, k]
    target_logprobs: torch.Tensor | None = None  # float32 [N]
    target_ranks: torch.Tensor | None = None  # int32 [N], 1-based
    tail_logmass: torch.Tensor | None = None  # float32 [N]

    @classmethod
    def cat(cls, parts: list[RowTopk], top_k: int, targets: bool, tail: bool) -> RowTopk:
        """Parts joined in order; no parts give zero rows with the same fields."""

        def join(tensors: list[torch.Tensor | None], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            present = [t for t in tensors if t is not None]
            return torch.cat(present) if present else torch.empty(shape, dtype=dtype)

        return cls(
            join([p.ids for p in parts], (0, top_k), torch.int32),
            join([p.logprobs for p in parts], (0, top_k), torch.float32),
            join([p.target_logprobs for p in parts], (0,), torch.float32) if targets else None,
            join([p.target_ranks for p in parts], (0,), torch.int32) if targets else None,
            join([p.tail_logmass for p in parts], (0,), torch.float32) if tail else None,
        )


def topk_rows(
    logits: torch.Tensor,
    top_k: int,
    targets: torch.Tensor | None = None,
    want_tail: bool = False,
    row_chunk: int = 1024,
) -> RowTopk:
    """Top-k log-probs of ``logits`` [N, V] in row chunks, without a full [N, V] log-softmax.

    With ``targets`` [N], also the actual next token's log-prob and vocabulary rank.
    The tail is the log-sum-exp of the logits outside the top-k minus the normalizer:
    exact, with no 1 - sum(p) cancellation.
    """
    n = logits.shape[0]
    out = RowTopk(torch.empty(n, top_k, dtype=torch.int32), torch.empty(n, top_k, dtype=torch.float32))
    if targets is not None:
        out.target_logprobs = torch.empty(n, dtype=torch.float32)
        out.target_ranks = torch.empty(n, dtype=torch.int32)
    if want_tail:
        out.tail_logmass = torch.empty(n, dtype=torch.float32)
    for lo in range(0, n, row_chunk):
        sl = slice(lo, lo + row_chunk)
        chunk = logits[sl].float()
        lse = torch.logsumexp(chunk, dim=-1, keepdim=True)
        vals, idx = torch.topk(chunk, top_k, dim=-1, sorted=True)
        out.ids[sl] = idx.to(torch.int32).cpu()
        out.logprobs[sl] = (vals - lse).cpu()
        if targets is not None and out.target_logprobs is not None and out.target_ranks is not None:
            t_logit = chunk.gather(-1, targets[sl].to(chunk.device).unsqueeze(-1))
            out.target_logprobs[sl] = (t_logit - lse).squeeze(-1).cpu()
            out.target_ranks[sl] = ((chunk > t_logit).sum(-1) + 1).to(torch.int32).cpu()
        if out.tail_logmass is not None:
            rest = torch.logsumexp(chunk.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
            out.tail_logmass[sl] = (rest - lse).squeeze(-1).cpu()
    return out


class HFEngine(ModelDirEngine):
    """Batched forward passes, run off the event loop, one at a time (the model is not re-entrant)."""

    engine_name = "transformers"
    can_generate = True

    def __init__(
        self,
        model_dir: str | Path,
        served_model_name: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        max_batch_tokens: int = 8192,
    ) -> None:
        super().__init__(model_dir, served_model_name)
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_TORCH_DTYPES)}")
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self._lock = threading.Lock()
        self._model: torch.nn.Module | None = None

    def load(self) -> None:
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=_TORCH_DTYPES[self.dtype])
        model.to(self.device).eval()
        self._model = model
        self._vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        logger.info(
            "loaded %s (%s, vocab %d, %s) from %s",
            self.served_model_name,
            type(model).__name__,
            self._vocab_size,
            model.dtype,
            self.model_dir,
        )

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
        """Top-k at the span rows of one padded forward pass."""
        assert self._model is not None
        input_ids, mask = pad_sequences(seqs, pad_id=0)  # any id would do: padded positions are masked
        logits = self._model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        b_idx, t_idx = span_positions(mask, spans)
        rows = logits[b_idx.to(self.device), t_idx.to(self.device)]
        targets = input_ids[b_idx, t_idx + 1] if job.want_target_logprobs else None
        return topk_rows(rows, job.top_k, targets, job.want_tail_logmass)

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
