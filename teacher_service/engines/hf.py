"""The embedded default engine: a Hugging Face transformers causal LM, CPU or GPU."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.alignment import padded_positions, row_offsets
from shared.codec import TopkFrame
from shared.fingerprint import tokenizer_fingerprint
from teacher_service.engines.base import ScoreJob, TeacherEngine

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def topk_rows(
    logits: torch.Tensor,
    top_k: int,
    targets: torch.Tensor | None = None,
    want_tail: bool = False,
    row_chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Top-k log-probs of ``logits`` [N, V] in row chunks, without a full [N, V] log-softmax.

    Returns (ids int32 [N, k], logprobs float32 [N, k], target logprobs [N] or None,
    tail log-mass [N] or None). The tail is the log-sum-exp of the logits outside the
    top-k minus the normalizer: exact, with no 1 - sum(p) cancellation.
    """
    n = logits.shape[0]
    ids = torch.empty(n, top_k, dtype=torch.int32)
    lps = torch.empty(n, top_k, dtype=torch.float32)
    tgt = torch.empty(n, dtype=torch.float32) if targets is not None else None
    tail = torch.empty(n, dtype=torch.float32) if want_tail else None
    for lo in range(0, n, row_chunk):
        chunk = logits[lo : lo + row_chunk].float()
        lse = torch.logsumexp(chunk, dim=-1, keepdim=True)
        vals, idx = torch.topk(chunk, top_k, dim=-1, sorted=True)
        ids[lo : lo + row_chunk] = idx.to(torch.int32).cpu()
        lps[lo : lo + row_chunk] = (vals - lse).cpu()
        if targets is not None and tgt is not None:
            t = targets[lo : lo + row_chunk].to(chunk.device).unsqueeze(-1)
            tgt[lo : lo + row_chunk] = (chunk.gather(-1, t) - lse).squeeze(-1).cpu()
        if tail is not None:
            rest = torch.logsumexp(chunk.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
            tail[lo : lo + row_chunk] = (rest - lse).squeeze(-1).cpu()
    return ids, lps, tgt, tail


class HFEngine(TeacherEngine):
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
        super().__init__(served_model_name or Path(model_dir).name)
        self.model_dir = str(model_dir)
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_TORCH_DTYPES)}")
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self._lock = threading.Lock()
        self._model: torch.nn.Module | None = None
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._fingerprint = tokenizer_fingerprint(self._tokenizer)
        self._vocab_size = 0
        self._max_len = 0

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def tokenizer_fingerprint(self) -> str:
        return self._fingerprint

    @property
    def max_model_len(self) -> int:
        return self._max_len

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
        return _concat_frames(parts, job)

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
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, seq in enumerate(seqs):
            input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[b, : len(seq)] = 1
        logits = self._model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        b_idx, t_idx = padded_positions(mask, firsts)
        rows = logits[b_idx.to(self.device), t_idx.to(self.device)]
        targets = input_ids[b_idx, t_idx + 1] if job.want_target_logprobs else None
        ids, lps, tgt, tail = topk_rows(rows, job.top_k, targets, job.want_tail_logmass)
        return TopkFrame(
            token_ids=ids,
            logprobs=lps,
            row_offsets=row_offsets([len(s) for s in seqs], firsts),
            first_rows=torch.tensor(firsts, dtype=torch.int64),
            target_logprobs=tgt,
            tail_logmass=tail,
        )


def _concat_frames(parts: list[TopkFrame], job: ScoreJob) -> TopkFrame:
    if len(parts) == 1:
        return parts[0]
    offsets = row_offsets([len(s) for s in job.sequences], job.first_rows)

    def cat(name: str) -> torch.Tensor | None:
        tensors = [getattr(p, name) for p in parts]
        return None if tensors[0] is None else torch.cat(tensors)

    return TopkFrame(
        token_ids=torch.cat([p.token_ids for p in parts]),
        logprobs=torch.cat([p.logprobs for p in parts]),
        row_offsets=offsets,
        first_rows=torch.tensor(job.first_rows, dtype=torch.int64),
        target_logprobs=cat("target_logprobs"),
        tail_logmass=cat("tail_logmass"),
    )
