"""Generated completions for the steps that do not train on the dataset's: on-policy (the student's own
samples) and sequence-level KD (the in-process teacher's)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from student_trainer.config import TrainerConfig
from student_trainer.data import Batch
from student_trainer.generation import generate_completions
from student_trainer.schedule import Source, derived_seed
from student_trainer.teacher import LocalTeacher, Teacher
from student_trainer.teacher.rows import Handle, TeacherRows


def with_generated_completions(
    config: TrainerConfig,
    source: Source,
    batch: Batch,
    engine: Any,
    teacher: Teacher,
    tokenizer: Any,
    step: int,
    micro: int,
) -> Batch:
    """The micro-batch's prompts with completions sampled from the student or the teacher.

    Prompts keep their last tokens so that prompt + ``max_new_tokens`` fits ``max_length``; the
    sampling seed is derived from (seed, step, rank, micro-batch), so a resumed run samples the same.
    """
    assert config.max_new_tokens is not None  # TrainerConfig requires it when completions are generated
    keep = config.max_length - config.max_new_tokens
    prompts = [p[-keep:] for p in batch.prompts()]
    sampling = {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.generation_temperature,
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
        "seed": derived_seed(config.seed, step, dist.get_rank(), micro),
    }
    if source == "student":
        synced = engine.zero_optimization_stage() == 3  # every rank runs as many forwards as the longest
        completions = generate_completions(engine.module.model, prompts, synced_gpus=synced, **sampling)
    else:
        if not isinstance(teacher, LocalTeacher):
            raise TypeError("sequence-level KD needs an in-process teacher (--teacher_model_name_or_path)")
        completions = teacher.generate(prompts, **sampling)
    return batch.with_completions(prompts, completions, tokenizer.pad_token_id)


def generated_step(
    config: TrainerConfig,
    source: Source,
    batches: list[Batch],
    engine: Any,
    teacher: Teacher,
    tokenizer: Any,
    step: int,
) -> list[tuple[Batch, Handle[TeacherRows] | None]]:
    """Each micro-batch with generated completions, its teacher rows requested while the next one generates."""
    items: list[tuple[Batch, Handle[TeacherRows] | None]] = []
    for micro, batch in enumerate(batches):
        new = with_generated_completions(config, source, batch, engine, teacher, tokenizer, step, micro)
        items.append((new, teacher.request(new)))
    return items
