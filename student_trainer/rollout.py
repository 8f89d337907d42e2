"""Generated completions for the steps that do not train on the dataset's: on-policy (the student's own
samples, from the ``--rollout_engine``) and sequence-level KD (the in-process teacher's).

:class:`OnPolicy` keeps the rollout engine's weights current and, with ``--async_rollouts``, samples
and scores the next on-policy step's completions on a worker thread while this step trains (one step
off-policy, as verl's one-step-off scheduler): every micro-batch is tagged with the policy version
(optimizer steps) that sampled it, and one older than ``--max_staleness`` steps is dropped and sampled
again from the current weights.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import torch.distributed as dist

from student_trainer.config import TrainerConfig
from student_trainer.data import Batch
from student_trainer.rollouts import RolloutEngine, Sampling
from student_trainer.schedule import Source, derived_seed
from student_trainer.teacher import LocalTeacher, Teacher
from student_trainer.teacher.rows import Handle, TeacherRows

logger = logging.getLogger(__name__)

Items = list[tuple[Batch, Handle[TeacherRows] | None]]


def stop_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The generation config's EOS ids (a chat model often has several), else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the student has no EOS token (generation_config.eos_token_id or tokenizer.eos_token_id)")
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def sampling_for(config: TrainerConfig, stops: tuple[int, ...], pad_id: int) -> Sampling:
    assert config.max_new_tokens is not None  # TrainerConfig requires it when completions are generated
    return Sampling(config.max_new_tokens, config.generation_temperature, stops, pad_id)


def prompts_of(config: TrainerConfig, batch: Batch) -> list[list[int]]:
    """Prompts keep their last tokens so that prompt + ``max_new_tokens`` fits ``max_length``."""
    assert config.max_new_tokens is not None
    keep = config.max_length - config.max_new_tokens
    return [p[-keep:] for p in batch.prompts()]


def with_generated_completions(
    config: TrainerConfig,
    source: Source,
    batch: Batch,
    rollouts: RolloutEngine | None,
    teacher: Teacher,
    sampling: Sampling,
    step: int,
    micro: int,
) -> tuple[Batch, int]:
    """The micro-batch's prompts with completions sampled from the student or the teacher, and the policy
    version that sampled them (-1 for the teacher).

    The sampling seed is derived from (seed, step, rank, micro-batch), so a resumed run samples the same.
    """
    prompts = prompts_of(config, batch)
    seed = derived_seed(config.seed, step, dist.get_rank(), micro)
    if source == "student":
        assert rollouts is not None
        out = rollouts.generate(prompts, sampling, seed)
        return batch.with_completions(prompts, out.completions, sampling.pad_id), out.version
    if not isinstance(teacher, LocalTeacher):
        raise TypeError("sequence-level KD needs an in-process teacher (--teacher_model_name_or_path)")
    completions = teacher.generate(
        prompts,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        eos_id=sampling.stop_ids,
        pad_id=sampling.pad_id,
        seed=seed,
    )
    return batch.with_completions(prompts, completions, sampling.pad_id), -1


def generated_step(
    config: TrainerConfig,
    source: Source,
    batches: list[Batch],
    rollouts: RolloutEngine | None,
    teacher: Teacher,
    sampling: Sampling,
    step: int,
) -> tuple[Items, list[int]]:
    """Each micro-batch with generated completions, its teacher rows requested while the next one generates;
    and the policy version of each."""
    items: Items = []
    versions = []
    for micro, batch in enumerate(batches):
        new, version = with_generated_completions(config, source, batch, rollouts, teacher, sampling, step, micro)
        items.append((new, teacher.request(new, on_policy=source == "student")))
        versions.append(version)
    return items, versions


@dataclass
class RolloutStats:
    """Rollout time and staleness since the last log record (this rank)."""

    generate_s: float = 0.0  # sampling (and submitting to the teacher), on whichever thread
    wait_s: float = 0.0  # the training loop waiting for rollouts (all of it when synchronous)
    sync_s: float = 0.0  # pushing weights into the rollout engine
    staleness_sum: float = 0.0
    staleness_max: float = 0.0
    micro_batches: float = 0.0
    dropped: float = 0.0

    def record(self) -> dict[str, float]:
        out = {
            "rollout_generate_s": self.generate_s,
            "rollout_wait_s": self.wait_s,
            "weight_sync_s": self.sync_s,
            "rollouts_dropped": self.dropped,
        }
        if self.micro_batches:
            out["staleness_mean"] = self.staleness_sum / self.micro_batches
            out["staleness_max"] = self.staleness_max
        return out

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0.0)


class OnPolicy:
    """The student's completions for on-policy steps, from the rollout engine kept at the trained weights."""

    def __init__(
        self, config: TrainerConfig, engine: Any, rollouts: RolloutEngine, teacher: Teacher, sampling: Sampling
    ) -> None:
        self.config, self.engine, self.rollouts = config, engine, rollouts
        self.teacher, self.sampling = teacher, sampling
        self.stats = RolloutStats()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts") if config.async_rollouts else None
        self._ahead: tuple[int, Future[tuple[Items, list[int]]]] | None = None

    def _sync(self, version: int) -> None:
        """Weights of ``version`` optimizer steps into the rollout engine (every rank at the same step)."""
        if self.rollouts.version != version:
            self.stats.sync_s += self.rollouts.sync(self.engine, version)

    def _generate(self, batches: list[Batch], step: int) -> tuple[Items, list[int]]:
        started = time.perf_counter()
        out = generated_step(self.config, "student", batches, self.rollouts, self.teacher, self.sampling, step)
        self.stats.generate_s += time.perf_counter() - started
        return out

    def items(self, step: int, batches: list[Batch]) -> Items:
        """Step ``step``'s micro-batches with the student's completions (the engine's weights are at step - 1):
        launched a step ahead with ``--async_rollouts``, else sampled now."""
        version = step - 1
        waited = time.perf_counter()
        if self._ahead is not None and self._ahead[0] == step:
            items, versions = self._ahead[1].result()
            self._ahead = None
        else:
            self._sync(version)
            items, versions = self._generate(batches, step)
        stale = [m for m, v in enumerate(versions) if version - v > self.config.max_staleness]
        if stale:  # sample those micro-batches again from the current weights
            self._sync(version)
            again, again_versions = self._generate([items[m][0] for m in stale], step)
            for m, item, v in zip(stale, again, again_versions, strict=True):
                items[m], versions[m] = item, v
            self.stats.dropped += len(stale)
        self.stats.wait_s += time.perf_counter() - waited
        for v in versions:
            self.stats.staleness_sum += version - v
            self.stats.staleness_max = max(self.stats.staleness_max, version - v)
        self.stats.micro_batches += len(versions)
        return items

    def launch(self, step: int, batches: list[Batch], version: int) -> None:
        """Start sampling step ``step``'s completions in the background from the weights at ``version``."""
        assert self._pool is not None, "launch needs --async_rollouts"
        if self._ahead is not None:
            raise RuntimeError(f"rollouts of step {self._ahead[0]} are still in flight")
        self._sync(version)
        self._ahead = (step, self._pool.submit(self._generate, batches, step))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.rollouts.close()
