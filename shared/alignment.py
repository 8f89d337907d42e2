"""The position convention, written once.

For a sequence of L tokens the teacher has L-1 rows. Row j is the distribution of
token j+1 given tokens 0..j: it lines up with the student's ``logits[:, j]`` and with
the label ``input_ids[:, j+1]``. vLLM's ``prompt_logprobs`` has L entries with entry 0
``None``; its entry j+1 is our row j.

Row spans name the rows a loss needs: per sequence a list of half-open ``[start, end)`` row
ranges, ascending and disjoint, inside ``[0, L-1)``. A conversation has one span per assistant
turn; ``first_rows[b]`` is the one-span case ``[(first_rows[b], L-1)]``. Rows of a batch are
always ordered sequence by sequence, span by span, row by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def num_rows(seq_len: int) -> int:
    """Rows a sequence of ``seq_len`` tokens has (one per predicted next token)."""
    return max(seq_len - 1, 0)


RowSpan = tuple[int, int]
"""Rows ``start .. end - 1`` of one sequence."""


def spans_from_first_rows(seq_lens: Sequence[int], first_rows: Sequence[int]) -> list[list[RowSpan]]:
    """The one-span-per-sequence form of ``first_rows``: rows ``first .. L-2`` (none when ``first = L-1``)."""
    return [[(f, num_rows(n))] if f < num_rows(n) else [] for n, f in zip(seq_lens, first_rows, strict=True)]


def check_row_spans(spans: Sequence[Sequence[int]], seq_len: int) -> str | None:
    """What is wrong with one sequence's spans (None if nothing): ascending, disjoint, non-empty, inside its rows."""
    limit, prev_end = num_rows(seq_len), 0
    for i, span in enumerate(spans):
        if len(span) != 2:
            return f"span {i} is {list(span)}, not [start, end]"
        start, end = span
        if not 0 <= start < end <= limit:
            return (
                f"span {i} [{start}, {end}) is empty or outside the rows [0, {limit}) of a sequence of {seq_len} tokens"
            )
        if start < prev_end:
            return f"span {i} [{start}, {end}) overlaps or precedes the span before it (spans ascend and are disjoint)"
        prev_end = end
    return None


def span_rows(spans: Sequence[Sequence[int]]) -> int:
    """Rows the spans of one sequence hold."""
    return sum(end - start for start, end in spans)


def as_row_spans(row_spans: Sequence[Sequence[Sequence[int]]]) -> list[list[RowSpan]]:
    """Spans as plain ``(start, end)`` int tuples (JSON gives lists, numpy and torch give their own ints)."""
    return [[(int(start), int(end)) for start, end in spans] for spans in row_spans]


def first_rows_of_spans(seq_lens: Sequence[int], row_spans: Sequence[Sequence[Sequence[int]]]) -> list[int]:
    """Each sequence's first row: its first span's start, or ``L-1`` (rows from there on: none) without spans.

    The inverse of :func:`spans_from_first_rows`, so a request by spans and one by ``first_rows`` naming
    the same rows have the same first rows.
    """
    return [int(spans[0][0]) if spans else num_rows(n) for n, spans in zip(seq_lens, row_spans, strict=True)]


def tokens_for_spans(spans: Sequence[Sequence[int]]) -> int:
    """Tokens a model must see to score one sequence's spans: up to the last span's last label (0 without spans).

    Row j needs tokens ``0..j+1`` (the context and the actual next token), so tokens after the last span's
    end change none of its rows: a scorer may leave them out, and skip a sequence without spans altogether.
    """
    return int(spans[-1][1]) + 1 if spans else 0


def span_row_offsets(row_spans: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """Ragged offsets [B+1] of the rows the spans of each sequence hold (the frame's ``row_offsets``)."""
    counts = torch.tensor([span_rows(spans) for spans in row_spans], dtype=torch.int64)
    offsets = torch.zeros(len(row_spans) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets


def span_positions(
    attention_mask: torch.Tensor, row_spans: Sequence[Sequence[Sequence[int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position index) in a padded ``[B, T]`` batch of every row of every span, in frame order.

    As :func:`padded_positions`, for any number of spans per sequence and either padding side.
    """
    starts = attention_mask.bool().int().argmax(dim=1)
    flat = [(b, s, e) for b, spans in enumerate(row_spans) for s, e in spans]
    if not flat:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    span_b, span_s, span_e = torch.tensor(flat, dtype=torch.int64).unbind(1)
    counts = span_e - span_s
    b_idx = torch.repeat_interleave(span_b, counts)
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    t_idx = starts[b_idx] + torch.repeat_interleave(span_s, counts) + within
    return b_idx, t_idx


def rows_of_spans(
    row_spans: Sequence[Sequence[Sequence[int]]], block_firsts: Sequence[int], block_rows: Sequence[int]
) -> torch.Tensor:
    """Indices, into rows computed as contiguous blocks (sequence b: rows ``block_firsts[b]`` on, ``block_rows[b]``
    of them, blocks concatenated), of the rows the spans name: how a span request is cut out of a full one."""
    picks, base = [], 0
    for spans, first, count in zip(row_spans, block_firsts, block_rows, strict=True):
        for start, end in spans:
            if start < first or end > first + count:
                raise ValueError(f"span [{start}, {end}) is outside the computed rows [{first}, {first + count})")
            picks.append(torch.arange(base + start - first, base + end - first))
        base += count
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.int64)


def vllm_entry_for_row(row: int) -> int:
    """Index into vLLM's ``prompt_logprobs`` list holding our row ``row``."""
    return row + 1


def row_offsets(seq_lens: Sequence[int], first_rows: Sequence[int]) -> torch.Tensor:
    """Ragged offsets [B+1] of the rows ``first_rows[b] .. seq_lens[b]-2`` of each sequence (one span each)."""
    if any(f > num_rows(n) for n, f in zip(seq_lens, first_rows, strict=True)):
        raise ValueError(f"first_rows {list(first_rows)} beyond the rows of lengths {list(seq_lens)}")
    return span_row_offsets(spans_from_first_rows(seq_lens, first_rows))


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
    """(batch index, position index) in a padded ``[B, T]`` batch for every teacher row from ``first_rows[b]`` on.

    The one-span case of :func:`span_positions`: right and left padding alike (a sequence's real tokens
    are where ``attention_mask`` is 1, assumed contiguous), in the ragged frame's order, so
    ``student_logits[b_idx, t_idx]`` is row-for-row aligned with the frame's rows.
    """
    lens = attention_mask.bool().sum(dim=1).tolist()
    firsts = torch.as_tensor(first_rows, dtype=torch.int64).tolist()
    return span_positions(attention_mask, spans_from_first_rows(lens, firsts))


def next_token_labels(input_ids: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """The actual token each row predicts: ``input_ids[b, t+1]``."""
    return input_ids[b_idx, t_idx + 1]
