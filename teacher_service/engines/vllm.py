"""The production engine: vLLM's ``AsyncLLM`` scoring token-id prompts through prompt log-probs.

Each sequence is one vLLM request (``max_tokens=1``, ``prompt_logprobs=k``); all of a job's
requests are issued at once and vLLM's scheduler batches them (continuous batching, chunked
prefill, tensor and data parallelism). vLLM is imported only when the engine starts, so the
base install does not need it.

The conversion to a :class:`TopkFrame` reads vLLM's flat layout with numpy instead of walking
per-entry dicts: in ``FlatLogprobs`` every position after the first holds exactly ``k + 1``
entries, ``[actual token, top-1, ..., top-k]``, already in rank order, so one reshape gives the
frame. The conversion functions take duck-typed inputs and are tested without vLLM.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from shared.alignment import num_rows, row_offsets, vllm_entry_for_row
from shared.codec import TopkFrame
from shared.logmath import tail_from_topk
from teacher_service.engines.base import ModelDirEngine, ScoreJob

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

WARMUP_SEQUENCE = [0, 1, 2, 3]
"""Scored once in ``start()``: vLLM's first request is slow (seconds), the service is ready after it."""


class FlatPromptLogprobs(Protocol):
    """The fields of vLLM's ``FlatLogprobs`` the conversion reads (position p owns entries start..end)."""

    start_indices: list[int]
    end_indices: list[int]
    token_ids: list[int]
    logprobs: list[float]


class PromptLogprobsLayoutError(RuntimeError):
    """vLLM's prompt log-probs are not laid out as this engine expects: refuse rather than misalign rows."""


def rows_from_flat(
    flat: FlatPromptLogprobs, sequence: Sequence[int], first_row: int, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(top-k ids int32 [n, k], top-k log-probs float32 [n, k], target log-probs float32 [n], target ranks [n]).

    Rows ``first_row .. len(sequence) - 2`` are vLLM entries ``first_row + 1 .. len(sequence) - 1``;
    each holds ``k + 1`` entries with the actual next token first. The layout is checked in bulk
    (offsets and actual tokens), so a change in vLLM raises instead of shifting rows.
    """
    n = num_rows(len(sequence)) - first_row
    width = top_k + 1
    first_entry = vllm_entry_for_row(first_row)
    last_entry = vllm_entry_for_row(num_rows(len(sequence)) - 1)
    if len(flat.start_indices) != len(sequence) or len(flat.end_indices) != len(sequence):
        raise PromptLogprobsLayoutError(
            f"{len(flat.start_indices)} prompt log-prob positions for a sequence of {len(sequence)} tokens"
        )
    lo, hi = flat.start_indices[first_entry], flat.end_indices[last_entry]
    starts = np.asarray(flat.start_indices[first_entry : last_entry + 1], dtype=np.int64)
    ends = np.asarray(flat.end_indices[first_entry : last_entry + 1], dtype=np.int64)
    expected = lo + width * np.arange(n, dtype=np.int64)
    if hi - lo != n * width or not (np.array_equal(starts, expected) and np.array_equal(ends, expected + width)):
        raise PromptLogprobsLayoutError(f"prompt log-prob positions do not hold {width} (1 + top_k) entries each")
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(n, width)
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(n, width)
    _check_actual_tokens(ids[:, 0], sequence, first_row)
    ranks = np.asarray(flat.ranks[lo:hi], dtype=np.int32).reshape(n, width)[:, 0]
    return ids[:, 1:].astype(np.int32), np.ascontiguousarray(lps[:, 1:]), np.ascontiguousarray(lps[:, 0]), ranks


def rows_from_dicts(
    positions: Sequence[Mapping[int, Any] | None], sequence: Sequence[int], first_row: int, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same arrays from vLLM's dict form (``list[None | dict[int, Logprob]]``), for vLLMs without flat mode.

    A position's first key is the actual token. It has ``k + 1`` keys when the actual token is
    outside the top-k and ``k`` when inside (the duplicate collapsed, its rank then being its
    top-k rank); the top-k ranks 1..k give each entry its column, so no sorting is needed.
    """
    if len(positions) != len(sequence):
        raise PromptLogprobsLayoutError(f"{len(positions)} prompt log-prob positions for {len(sequence)} tokens")
    n = num_rows(len(sequence)) - first_row
    ids = np.full((n, top_k), -1, dtype=np.int32)
    lps = np.empty((n, top_k), dtype=np.float32)
    target = np.empty(n, dtype=np.float32)
    ranks = np.empty(n, dtype=np.int32)
    actual = np.empty(n, dtype=np.int64)
    for i, entry in enumerate(positions[vllm_entry_for_row(first_row) :]):
        if entry is None:
            raise PromptLogprobsLayoutError(f"no prompt log-probs for row {first_row + i}")
        items = list(entry.items())
        actual[i], target[i], ranks[i] = items[0][0], items[0][1].logprob, items[0][1].rank
        top = items if len(items) == top_k else items[1:]
        if len(top) != top_k:
            raise PromptLogprobsLayoutError(f"row {first_row + i} has {len(items)} entries for top_k={top_k}")
        for token_id, logprob in top:
            ids[i, logprob.rank - 1] = token_id
            lps[i, logprob.rank - 1] = logprob.logprob
    if (ids < 0).any():
        raise PromptLogprobsLayoutError("top-k ranks of the dict form are not 1..top_k")
    _check_actual_tokens(actual, sequence, first_row)
    return ids, lps, target, ranks


def _check_actual_tokens(actual: np.ndarray, sequence: Sequence[int], first_row: int) -> None:
    """Row j's actual-token entry must be token j+1 of the sequence: the alignment, asserted per row."""
    expected = np.asarray(sequence[first_row + 1 :], dtype=np.int64)
    if actual.shape != expected.shape or not np.array_equal(actual, expected):
        raise PromptLogprobsLayoutError("the actual-token entries of vLLM's prompt log-probs are not the next tokens")


def rows_from_prompt_logprobs(
    prompt_logprobs: Any, sequence: Sequence[int], first_row: int, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dispatch on vLLM's two prompt log-prob forms (flat, or a list of dicts)."""
    if hasattr(prompt_logprobs, "start_indices"):
        return rows_from_flat(prompt_logprobs, sequence, first_row, top_k)
    return rows_from_dicts(prompt_logprobs, sequence, first_row, top_k)


def frame_from_prompt_logprobs(prompt_logprobs: Sequence[Any], job: ScoreJob) -> TopkFrame:
    """The job's frame from one vLLM ``prompt_logprobs`` per sequence (same order as ``job.sequences``)."""
    if len(prompt_logprobs) != len(job.sequences):
        raise PromptLogprobsLayoutError(f"{len(prompt_logprobs)} results for {len(job.sequences)} sequences")
    parts = [
        rows_from_prompt_logprobs(pl, seq, first, job.top_k)
        for pl, seq, first in zip(prompt_logprobs, job.sequences, job.first_rows, strict=True)
    ]
    lps = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return TopkFrame(
        token_ids=torch.from_numpy(np.concatenate([p[0] for p in parts])),
        logprobs=lps,
        row_offsets=row_offsets([len(s) for s in job.sequences], job.first_rows),
        first_rows=torch.tensor(job.first_rows, dtype=torch.int64),
        target_logprobs=torch.from_numpy(np.concatenate([p[2] for p in parts])) if job.want_target_logprobs else None,
        target_ranks=torch.from_numpy(np.concatenate([p[3] for p in parts])) if job.want_target_logprobs else None,
        tail_logmass=tail_from_topk(lps) if job.want_tail_logmass else None,
    )


class VLLMEngine(ModelDirEngine):
    """vLLM ``AsyncLLM`` in this process's event loop; its engine core and workers are child processes.

    They are started with spawn (vLLM forces it on CPU), which re-imports the parent's ``__main__``:
    a script embedding this engine needs an ``if __name__ == "__main__":`` guard, as
    ``python -m teacher_service`` and pytest have. All calls must come from the loop that ran ``start()``.
    Settings fixed for scoring: ``max_logprobs`` = the service's largest k (vLLM refuses more),
    prefix caching off (prompt log-probs skip it anyway, and one known bug made results depend on
    request order), raw (temperature 1) log-probs.
    """

    engine_name = "vllm"
    batches_internally = True  # vLLM's scheduler merges concurrent requests itself

    def __init__(
        self,
        model_dir: str | Path,
        served_model_name: str | None = None,
        *,
        max_top_k: int = 64,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_num_batched_tokens: int | None = None,
        enforce_eager: bool = False,
    ) -> None:
        super().__init__(model_dir, served_model_name)
        self.max_top_k = max_top_k
        self.engine_kwargs: dict[str, Any] = {
            "model": self.model_dir,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "data_parallel_size": data_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "max_num_batched_tokens": max_num_batched_tokens,
            "enforce_eager": enforce_eager,
            "max_logprobs": max_top_k,
            "enable_prefix_caching": False,
            "logprobs_mode": "raw_logprobs",
            "disable_log_stats": True,
        }
        self._engine: AsyncLLM | None = None
        self._flat = False
        self._params: dict[int, SamplingParams] = {}
        # Unique across engines and restarts: vLLM keys its request state by these ids.
        self._id_prefix = f"gkd-{uuid.uuid4().hex[:12]}"
        self._job_ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        """Longest sequence accepted: vLLM's max_model_len minus the one token ``max_tokens=1`` generates."""
        return self._max_len

    async def start(self) -> None:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.perf_counter()
        logger.info("starting vLLM AsyncLLM: %s", self.engine_kwargs)
        self._flat = "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ())
        if not self._flat:
            logger.warning("this vLLM has no flat_logprobs; reading prompt log-probs from dicts (slower)")
        # Built on the event loop's thread: AsyncLLM binds its output handler to the running loop.
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_kwargs))
        try:
            model_config = self._engine.model_config
            self._vocab_size = int(model_config.get_vocab_size())
            self._max_len = int(model_config.max_model_len) - 1
            logger.info(
                "vLLM engine up in %.1fs (vocab %d, max_model_len %d); warming up",
                time.perf_counter() - started,
                self._vocab_size,
                model_config.max_model_len,
            )
            warm = time.perf_counter()
            await self.score(
                ScoreJob(sequences=[WARMUP_SEQUENCE], first_rows=[0], top_k=min(self.max_top_k, self._vocab_size))
            )
            logger.info("vLLM warm-up request took %.1fs", time.perf_counter() - warm)
        except BaseException:
            await self.close()
            raise

    def _sampling_params(self, top_k: int) -> SamplingParams:
        params = self._params.get(top_k)
        if params is None:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            extra = {"flat_logprobs": True} if self._flat else {}
            params = SamplingParams(
                max_tokens=1,
                prompt_logprobs=top_k,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
                **extra,
            )
            self._params[top_k] = params
        return params

    async def score(self, job: ScoreJob) -> TopkFrame:
        """One vLLM request per sequence, all in flight together; any failure fails the whole job."""
        if self._engine is None:
            raise RuntimeError("vLLM engine not started")
        engine = self._engine
        params = self._sampling_params(job.top_k)
        prefix = f"{self._id_prefix}-{next(self._job_ids)}"
        tasks = [
            asyncio.ensure_future(self._prompt_logprobs(engine, f"{prefix}-{b}", seq, params))
            for b, seq in enumerate(job.sequences)
        ]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # Abort the siblings (cancelling generate() aborts the vLLM request) before re-raising.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        # Off the event loop: list-to-array conversion of large batches takes a while.
        return await asyncio.to_thread(frame_from_prompt_logprobs, results, job)

    @staticmethod
    async def _prompt_logprobs(engine: AsyncLLM, request_id: str, sequence: list[int], params: SamplingParams) -> Any:
        from vllm import TokensPrompt

        final = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=sequence), params, request_id=request_id):
            final = out  # FINAL_ONLY: one output, after the whole prompt (all prefill chunks) is scored
        if final is None:
            raise RuntimeError(f"vLLM request {request_id} ended without an output")
        error = getattr(final, "error", None)
        if error is not None:
            raise RuntimeError(f"vLLM request {request_id} failed: {error}")
        reason = final.outputs[0].finish_reason if final.outputs else None
        if reason in ("abort", "error"):
            raise RuntimeError(f"vLLM request {request_id} finished with {reason!r}")
        if final.prompt_logprobs is None:
            raise RuntimeError(f"vLLM request {request_id} returned no prompt log-probs")
        return final.prompt_logprobs

    async def close(self) -> None:
        """Stop the engine core and workers; dropping the last reference keeps AsyncLLM.__del__ quiet at exit."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        started = time.perf_counter()
        engine.shutdown()
        del engine
        logger.info("vLLM engine shut down in %.1fs", time.perf_counter() - started)
