"""The step's loss is the token mean over all micro-batches and ranks, whatever their token counts."""

from __future__ import annotations

import pytest
import torch

from student_trainer.normalization import loss_scale

# tokens of each micro-batch: 2 ranks x 3 micro-batches, deliberately unequal
TOKENS = [[3, 11, 1], [7, 2, 16]]


def _per_token_losses(w: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, w.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x @ w).sin() ** 2  # any per-token loss with a non-trivial gradient


def _deepspeed_gradient(w0: torch.Tensor, scale_of: object) -> torch.Tensor:
    """What DeepSpeed applies: backward(loss / gas) per micro-batch, summed, then averaged over ranks."""
    world, gas = len(TOKENS), len(TOKENS[0])
    per_rank = []
    for r, counts in enumerate(TOKENS):
        w = w0.clone().requires_grad_(True)
        for m, n in enumerate(counts):
            loss_sum = _per_token_losses(w, n, seed=10 * r + m).sum()
            (loss_sum * scale_of(n) / gas).backward()  # engine.backward divides by gas
        per_rank.append(w.grad)
    return torch.stack(per_rank).sum(0) / world  # all-reduce average over data-parallel ranks


def test_scaled_micro_batches_give_the_full_batch_token_mean_gradient() -> None:
    w0 = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    world, gas = len(TOKENS), len(TOKENS[0])
    total = sum(map(sum, TOKENS))
    scale = loss_scale(total, world, gas)
    got = _deepspeed_gradient(w0, lambda n: scale)

    w = w0.clone().requires_grad_(True)
    full = torch.cat([_per_token_losses(w, n, seed=10 * r + m) for r, c in enumerate(TOKENS) for m, n in enumerate(c)])
    assert full.numel() == total
    full.mean().backward()
    torch.testing.assert_close(got, w.grad, rtol=1e-12, atol=1e-12)

    # the per-micro-batch mean (what the scale avoids) is measurably different with these counts
    biased = _deepspeed_gradient(w0, lambda n: 1.0 / n)
    assert (biased - w.grad).abs().max() > 1e-3


def test_equal_counts_reduce_to_the_plain_mean() -> None:
    assert loss_scale(4 * 3 * 10, world_size=4, grad_accum_steps=3) == pytest.approx(1 / 10)


def test_a_step_without_tokens_is_refused() -> None:
    with pytest.raises(ValueError, match="loss tokens"):
        loss_scale(0, 2, 1)
