"""Where the student's on-policy samples come from: one interface, two engines.

``base`` holds the contract (:class:`RolloutEngine`, :class:`Sampling`, :class:`Rollouts`); ``hf`` samples
with the training model's own ``generate`` (the default, nothing to sync); ``vllm`` runs a vLLM engine
colocated in each trainer rank's process, into which the DeepSpeed weights are pushed at optimizer-step
boundaries. ``background`` runs either on a worker thread for ``--async_rollouts``.
"""

from __future__ import annotations

from typing import Any

from student_trainer.rollouts.base import RolloutEngine, Rollouts, Sampling

__all__ = ["RolloutEngine", "Rollouts", "Sampling", "open_rollout_engine"]


def open_rollout_engine(kind: str, engine: Any, model_path: str, **vllm_options: Any) -> RolloutEngine:
    """The ``--rollout_engine`` for the DeepSpeed ``engine`` (built after ``torch.distributed`` is up)."""
    if kind == "hf":
        from student_trainer.rollouts.hf import HFRollouts

        return HFRollouts(engine)
    if kind == "vllm":
        from student_trainer.rollouts.vllm import VllmRollouts

        return VllmRollouts(engine, model_path, **vllm_options)
    raise ValueError(f"unknown rollout engine {kind!r}; expected 'hf' or 'vllm'")
