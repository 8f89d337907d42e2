"""Sampled completions for on-policy (student) and sequence-level KD (teacher) steps.

No gradient flows through sampling. The sampler's RNG is forked and seeded per
(seed, step, rank, micro-batch), so generated completions neither disturb the training
RNG nor change when a run resumes from a checkpoint. Under ZeRO-3 every rank must run
the same number of forward passes (each gathers parameter shards from all ranks), which
``synced_gpus=True`` guarantees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from shared.alignment import pad_sequences


def generate_completions(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int | Sequence[int],
    pad_id: int,
    seed: int,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Per prompt, the generated tokens up to and including the first stop id of ``eos_id`` (or ``max_new_tokens``
    of them)."""
    stop_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    device = next(model.parameters()).device
    ids, mask = pad_sequences(prompts, pad_id, side="left")  # every prompt ends where generation starts
    width = ids.shape[1]
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stop_ids, **sampling)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                synced_gpus=synced_gpus,
            )
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        ends = [i for i, t in enumerate(row) if t in stop_ids]
        if ends:
            row = row[: ends[0] + 1]
        completions.append(row)
    return completions
