"""The production engine: vLLM's ``AsyncLLM`` scoring token-id prompts through prompt log-probs.

Each sequence is one vLLM request (``max_tokens=1``, ``prompt_logprobs=k``); all of a job's
requests are issued at once and vLLM's scheduler batches them (continuous batching, chunked
prefill, tensor and data parallelism). vLLM is imported only when the engine starts, so the
base install does not need it.

The conversion to a :class:`TopkFrame` reads vLLM's flat layout with numpy instead of walking
per-entry dicts (``flat_logprobs=True`` where the installed vLLM has it); the readers of both
forms live in :mod:`shared.vllm_logprobs`, take duck-typed inputs and are tested without vLLM.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shared.alignment import RowSpan, tokens_for_spans
from shared.codec import TopkFrame
from shared.logmath import tail_from_topk
from shared.vllm_logprobs import PromptLogprobsError, PromptRows, rows_from_prompt_logprobs
from teacher_service.engines.base import EngineDeadError, ModelDirEngine, ScoreJob
from teacher_service.engines.generation import Completion, GenerateJob

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

WARMUP_SEQUENCE = [0, 1, 2, 3]
"""Scored once in ``start()``: vLLM's first request is slow (seconds), the service is ready after it."""


def frame_from_prompt_logprobs(prompt_logprobs: Sequence[Any | None], job: ScoreJob) -> TopkFrame:
    """The job's frame from one vLLM ``prompt_logprobs`` per sequence (same order as ``job.sequences``).

    vLLM scores whole prompts: sequence b's rows are read from its first span's start through its last
    span's end (the prompt was cut there, see :func:`prompt_for_spans`), then the span rows are cut out.
    A sequence without spans was not sent and has None here.
    """
    if len(prompt_logprobs) != len(job.sequences):
        raise PromptLogprobsError(f"{len(prompt_logprobs)} results for {len(job.sequences)} sequences")
    parts: list[PromptRows] = []
    for b, (pl, seq, spans) in enumerate(zip(prompt_logprobs, job.sequences, job.row_spans, strict=True)):
        if not spans:
            continue
        if pl is None:
            raise PromptLogprobsError(f"no prompt log-probs for sequence {b}, which has row spans")
        parts.append(rows_from_prompt_logprobs(pl, prompt_for_spans(seq, spans), spans[0][0], job.top_k))

    def cat(arrays: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrays) if arrays else np.empty(shape, dtype=dtype))

    k, targets = job.top_k, job.want_target_logprobs
    block = TopkFrame(
        token_ids=cat([p.token_ids for p in parts], (0, k), np.int32),
        logprobs=cat([p.logprobs for p in parts], (0, k), np.float32),
        row_offsets=torch.tensor([0, *itertools.accumulate(len(p.token_ids) for p in parts)], dtype=torch.int64),
        first_rows=torch.tensor([spans[0][0] for spans in job.row_spans if spans], dtype=torch.int64),
        target_logprobs=cat([p.target_logprobs for p in parts], (0,), np.float32) if targets else None,
        target_ranks=cat([p.target_ranks for p in parts], (0,), np.int32) if targets else None,
    )
    frame = TopkFrame.from_blocks(block, job.row_spans, job.seq_lens)
    if job.want_tail_logmass:
        frame.tail_logmass = tail_from_topk(frame.logprobs)
    return frame


CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def cpu_thread_binding(cpus: Sequence[int], workers: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``workers`` CPU workers its own contiguous share of
    ``cpus``: "0|1" for 2 workers on 2 cores. vLLM reads the lists in [DP, PP, TP] rank order."""
    if len(cpus) < workers:
        raise ValueError(
            f"{workers} vLLM CPU workers (tensor x data parallel) need a core each; this process may use "
            f"{len(cpus)}: lower the parallel sizes or set {CPU_BIND_ENV} yourself"
        )
    ordered, share = sorted(cpus), len(cpus) // workers
    groups = [ordered[i * share : (i + 1) * share] for i in range(workers)]
    groups[-1] += ordered[workers * share :]  # the remainder goes to the last worker
    return "|".join(",".join(map(str, g)) for g in groups)


def bind_cpu_workers(tensor_parallel_size: int, data_parallel_size: int) -> None:
    """On vllm-cpu with tensor parallelism, bind one share of this process's cores per worker, unless
    ``VLLM_CPU_OMP_THREADS_BIND`` is set: vLLM's automatic binding wants one NUMA node per worker and
    refuses ("Not enough allowed NUMA nodes") on a one-node machine. Data parallelism alone needs nothing."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or tensor_parallel_size == 1 or CPU_BIND_ENV in os.environ:
        return
    binding = cpu_thread_binding(sorted(os.sched_getaffinity(0)), tensor_parallel_size * data_parallel_size)
    os.environ[CPU_BIND_ENV] = binding
    logger.info("vLLM on CPU with tensor parallelism: %s=%r (one share of cores per worker)", CPU_BIND_ENV, binding)


def prompt_for_spans(sequence: list[int], spans: list[RowSpan]) -> list[int]:
    """The tokens vLLM is sent for a sequence's spans: up to the last span's last label (later ones change
    none of its rows, see :func:`shared.alignment.tokens_for_spans`)."""
    return sequence[: tokens_for_spans(spans)]


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
    can_generate = True
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
        kv_cache_memory_bytes: int | None = None,
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
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
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
        bind_cpu_workers(self.engine_kwargs["tensor_parallel_size"], self.engine_kwargs["data_parallel_size"])
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
                ScoreJob.from_first_rows(
                    sequences=[WARMUP_SEQUENCE], first_rows=[0], top_k=min(self.max_top_k, self._vocab_size)
                )
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
        """One vLLM request per sequence with spans (cut after its last span), all in flight together; any
        failure fails the whole job."""
        if self._engine is None:
            raise RuntimeError("vLLM engine not started")
        if job.temperature != 1.0:  # the service refuses these with a 400 first (applies_temperature is False)
            raise ValueError(f"the vLLM engine scores at temperature 1 only, not {job.temperature}")
        engine = self._engine
        params = self._sampling_params(job.top_k)
        prefix = f"{self._id_prefix}-{next(self._job_ids)}"
        scored = [b for b, spans in enumerate(job.row_spans) if spans]
        tasks = [
            asyncio.ensure_future(
                self._prompt_logprobs(
                    engine, f"{prefix}-{b}", prompt_for_spans(job.sequences[b], job.row_spans[b]), params
                )
            )
            for b in scored
        ]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            # Abort the siblings (cancelling generate() aborts the vLLM request) before re-raising.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        results: list[Any | None] = [None] * len(job.sequences)
        for b, answer in zip(scored, answers, strict=True):
            results[b] = answer
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

    def check_health(self) -> None:
        """Dead once vLLM marks itself errored: its engine core process exited (vLLM's monitor thread sees it)
        or its output handler failed. ``AsyncLLM.check_health`` reads the same ``errored`` flag."""
        engine = self._engine
        if engine is not None and engine.errored:
            raise EngineDeadError("the vLLM engine died (engine core process gone or output handler failed)")

    async def close(self) -> None:
        """Stop the engine core and workers; dropping the last reference keeps AsyncLLM.__del__ quiet at exit."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        started = time.perf_counter()
        engine.shutdown()
        del engine
        logger.info("vLLM engine shut down in %.1fs", time.perf_counter() - started)

    # --- generation: vLLM natively, one request per prompt (its n samples fanned out by vLLM)

    @property
    def max_total_tokens(self) -> int:
        """vLLM's own max_model_len: a completion may use the position scoring keeps free."""
        return self._max_len + 1

    async def generate(self, job: GenerateJob) -> list[list[Completion]]:
        """All prompts in flight together; a failure or a cancellation aborts every request of the job."""
        if self._engine is None:
            raise RuntimeError("vLLM engine not started")
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=job.n,
            max_tokens=job.max_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            top_k=job.top_k,
            seed=job.seed,
            stop=list(job.stop),
            stop_token_ids=list(job.stop_token_ids),
            ignore_eos=job.ignore_eos,
            include_stop_str_in_output=job.include_stop_str_in_output,
            skip_special_tokens=job.skip_special_tokens,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        engine, prefix = self._engine, f"{self._id_prefix}-{next(self._job_ids)}"
        tasks = [
            asyncio.ensure_future(self._completions(engine, f"{prefix}-g{i}", prompt, params))
            for i, prompt in enumerate(job.prompts)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # cancelling generate() aborts the vLLM request
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    @staticmethod
    async def _completions(
        engine: AsyncLLM, request_id: str, prompt: list[int], params: SamplingParams
    ) -> list[Completion]:
        from vllm import TokensPrompt

        final = None
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id=request_id):
            final = out
        if final is None:
            raise RuntimeError(f"vLLM request {request_id} ended without an output")
        error = getattr(final, "error", None)
        if error is not None:
            raise RuntimeError(f"vLLM request {request_id} failed: {error}")
        completions = []
        for sample in sorted(final.outputs, key=lambda o: o.index):
            if sample.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request {request_id} finished with {sample.finish_reason!r}")
            completions.append(
                Completion(list(sample.token_ids), sample.text, sample.finish_reason, sample.stop_reason)
            )
        if len(completions) != params.n:
            raise RuntimeError(f"vLLM request {request_id} returned {len(completions)} samples for n={params.n}")
        return completions
