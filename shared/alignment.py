"""The position convention, written once.

For a sequence of L tokens the teacher has L-1 rows. Row j is the distribution of
token j+1 given tokens 0..j: it lines up with the student's ``logits[:, j]`` and with
the label ``input_ids[:, j+1]``. vLLM's ``prompt_logprobs`` has L entries with entry 0
``None``; its entry j+1 is our row j.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def num_rows(seq_len: int) -> int:
    """Rows a sequence of ``seq_len`` tokens has (one per predicted next token)."""
    return max(seq_len - 1, 0)


def vllm_entry_for_row(row: int) -> int:
    """Index into vLLM's ``prompt_logprobs`` list holding our row ``row``."""
    return row + 1


def row_offsets(seq_lens: Sequence[int], first_rows: Sequence[int]) -> torch.Tensor:
    """Ragged offsets [B+1] of the rows ``first_rows[b] .. seq_lens[b]-2`` of each sequence."""
    counts = [num_rows(n) - f for n, f in zip(seq_lens, first_rows, strict=True)]
    if any(c < 0 for c in counts):
        raise ValueError(f"first_rows {list(first_rows)} beyond the rows of lengths {list(seq_lens)}")
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    return offsets


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T] of token sequences padded to the longest.

    Right padding for scoring and training; left padding for generation, so that every
    prompt ends where the generated tokens start. :func:`padded_positions` reads both.
    """
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for b, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[b, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask


def padded_positions(
    attention_mask: torch.Tensor, first_rows: Sequence[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position index) in a padded ``[B, T]`` batch for every teacher row.

    Works for right and left padding alike: a sequence's real tokens are the
    positions where ``attention_mask`` is 1 (assumed contiguous), so its row j sits at
    padded position ``start + j`` where ``start`` is the index of its first real token.
    The order matches the ragged frame (sequence by sequence, rows ascending), so
    ``student_logits[b_idx, t_idx]`` is row-for-row aligned with the frame's rows.
    """
    mask = attention_mask.bool()
    lens = mask.sum(dim=1)
    starts = mask.int().argmax(dim=1)
    first = torch.as_tensor(first_rows, dtype=torch.int64)
    counts = (lens - 1 - first).clamp_min(0)
    b_idx = torch.repeat_interleave(torch.arange(mask.shape[0]), counts)
    seq_offsets = torch.cumsum(counts, 0) - counts
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(seq_offsets, counts)
    t_idx = starts[b_idx] + first[b_idx] + within
    return b_idx, t_idx


def next_token_labels(input_ids: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """The actual token each row predicts: ``input_ids[b, t+1]``."""
    return input_ids[b_idx, t_idx + 1]
