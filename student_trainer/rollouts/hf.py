"""Rollouts from the training module's own Hugging Face ``generate`` (the default engine).

Nothing to sync: it samples with the weights being trained. Under ZeRO-3 every rank runs as many
forward passes as the longest (``synced_gpus``), each gathering the parameter shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from shared.alignment import pad_sequences
from student_trainer.generation import generate_completions
from student_trainer.rollouts.base import Rollouts, Sampling


class HFRollouts:
    name = "hf"
    shares_weights = True

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._synced = engine.zero_optimization_stage() == 3
        self.version = 0

    def sync(self, engine: Any, version: int) -> float:
        self.version = version  # the same module: always current
        return 0.0

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int, with_logprobs: bool = False
    ) -> Rollouts:
        completions = generate_completions(
            self._engine.module.model,
            [list(p) for p in prompts],
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            eos_id=sampling.stop_ids,
            pad_id=sampling.pad_id,
            seed=seed,
            synced_gpus=self._synced,
        )
        logprobs = self._logprobs(prompts, completions, sampling.pad_id) if with_logprobs else None
        return Rollouts(completions, self.version, logprobs)

    @torch.no_grad()
    def _logprobs(
        self, prompts: Sequence[Sequence[int]], completions: list[list[int]], pad_id: int
    ) -> list[list[float]]:
        """Raw log-probs of the sampled tokens, from one forward pass of the module over prompt + completion."""
        model = self._engine.module.model
        ids, mask = pad_sequences([list(p) + c for p, c in zip(prompts, completions, strict=True)], pad_id)
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        out = []
        for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            rows = torch.log_softmax(logits[b, len(p) - 1 : len(p) - 1 + len(c)], dim=-1)
            out.append(rows.gather(-1, torch.tensor(c, device=device).unsqueeze(-1))[:, 0].tolist())
        return out

    def close(self) -> None:
        pass
