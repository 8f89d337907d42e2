"""The rollout contract: sample completions of token-id prompts from the current student policy.

A rollout engine holds a *policy version*: the number of optimizer steps whose weights it samples
from. :meth:`RolloutEngine.sync` brings it to the DeepSpeed engine's weights (a collective under
ZeRO-3: every rank calls it at the same step); :meth:`RolloutEngine.generate` samples with a seed
derived from (seed, step, rank, micro-batch), so a resumed run samples the same prompts alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled: the same for every engine."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    stop_ids: tuple[int, ...]  # the generation config's EOS ids: a completion ends with the first of them
    pad_id: int


@dataclass
class Rollouts:
    """One micro-batch of completions and the policy version that sampled them.

    ``logprobs`` (when asked for) are the sampling policy's raw (temperature 1) log-probs of each sampled token.
    """

    completions: list[list[int]]
    version: int
    logprobs: list[list[float]] | None = None


class RolloutEngine(Protocol):
    name: str
    version: int
    """Optimizer steps in the weights it samples from (-1 before the first sync where it keeps a copy)."""
    shares_weights: bool
    """Samples with the training module itself (no copy): it cannot run while a step trains."""

    def sync(self, engine: object, version: int) -> float:
        """Bring the sampling weights to the DeepSpeed ``engine``'s (now at ``version``); returns seconds spent."""
        ...

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int, with_logprobs: bool = False
    ) -> Rollouts: ...

    def close(self) -> None: ...


def trim_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first stop id."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return list(tokens[: i + 1])
    return list(tokens)
