"""The embedded default engine: a Hugging Face transformers causal LM, CPU or GPU."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from shared.alignment import pad_sequences, padded_positions, row_offsets
from shared.codec import TopkFrame
from teacher_service.engines.base import ModelDirEngine, ScoreJob

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
        warm = ScoreJob(sequences=[[0, 1, 2, 3]], first_rows=[0], top_k=1)
        await self.score(warm)

    async def score(self, job: ScoreJob) -> TopkFrame:
        return await asyncio.to_thread(self.score_sync, job)

    def score_sync(self, job: ScoreJob) -> TopkFrame:
        if self._model is None:
            raise RuntimeError("engine not loaded")
        parts: list[TopkFrame] = []
        with self._lock, torch.inference_mode():
            for lo, hi in self._token_budget_chunks(job.sequences):
                parts.append(self._score_chunk(job, lo, hi))
        return TopkFrame.concat(parts)

    def _token_budget_chunks(self, sequences: list[list[int]]) -> list[tuple[int, int]]:
        """Split the batch so a padded forward stays under ``max_batch_tokens``."""
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

    def _score_chunk(self, job: ScoreJob, lo: int, hi: int) -> TopkFrame:
        assert self._model is not None
        seqs = job.sequences[lo:hi]
        firsts = job.first_rows[lo:hi]
        input_ids, mask = pad_sequences(seqs, pad_id=0)  # any id would do: padded positions are masked
        logits = self._model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        b_idx, t_idx = padded_positions(mask, firsts)
        rows = logits[b_idx.to(self.device), t_idx.to(self.device)]
        targets = input_ids[b_idx, t_idx + 1] if job.want_target_logprobs else None
        res = topk_rows(rows, job.top_k, targets, job.want_tail_logmass)
        return TopkFrame(
            token_ids=res.ids,
            logprobs=res.logprobs,
            row_offsets=row_offsets([len(s) for s in seqs], firsts),
            first_rows=torch.tensor(firsts, dtype=torch.int64),
            target_logprobs=res.target_logprobs,
            tail_logmass=res.tail_logmass,
            target_ranks=res.target_ranks,
        )
