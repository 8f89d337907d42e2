"""vLLM's ``prompt_logprobs`` format, read and written in one place.

A sequence of L tokens has L positions; position 0 is ``None`` and position j+1 is our row j
(:func:`shared.alignment.vllm_entry_for_row`). A position holds the actual next token first, then
the top-k by rank; a top-k token equal to the actual one is not repeated, so a position has k or
k+1 entries. Three forms of it exist:

- vLLM's ``FlatLogprobs`` (``flat_logprobs=True``): flat lists, exactly ``k + 1`` entries a
  position, already in rank order; read with numpy (:func:`rows_from_flat`).
- vLLM's dict form, ``list[None | dict[int, Logprob]]`` (:func:`rows_from_dicts`), and
- the JSON of a ``/v1/completions`` answer, ``[null, {"<id>": {"logprob", "rank",
  "decoded_token"}}, ...]`` (:func:`parse_completions_json`, built by :func:`prompt_logprobs_entries`).

The two dict forms are read by one loop that places each entry by its rank (no sorting), told by an
:class:`_EntryForm` how to read a key and a value. Every reader checks the layout and the actual
tokens and raises :class:`PromptLogprobsError` rather than shift or fill a row. JSON has no -inf:
:data:`JSON_NEG_INF` stands for it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import orjson
import torch

from shared.alignment import num_rows, row_offsets, vllm_entry_for_row
from shared.codec import TopkFrame

JSON_NEG_INF = -9999.0
"""What vLLM writes for -inf in JSON, and so does the teacher service (binary frames keep -inf)."""


class PromptLogprobsError(ValueError):
    """Prompt log-probs are not laid out as vLLM lays them out: refuse rather than misalign rows."""


class PromptRows(NamedTuple):
    """One sequence's rows ``first_row ..`` read from prompt log-probs."""

    token_ids: np.ndarray  # int32 [n, k], by rank
    logprobs: np.ndarray  # float32 [n, k]
    target_logprobs: np.ndarray  # float32 [n]: the actual next token's
    target_ranks: np.ndarray  # int32 [n]: its 1-based vocabulary rank (empty from JSON, where it is not read)


class FlatPromptLogprobs(Protocol):
    """The fields of vLLM's ``FlatLogprobs`` read here (position p owns entries start..end)."""

    start_indices: list[int]
    end_indices: list[int]
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass(frozen=True)
class _EntryForm:
    """How one dict form of a position is read, and the words its errors use for the caller."""

    token: Callable[[Any], int]
    """A key -> its token id."""
    value: Callable[[Any], tuple[float, int]]
    """A value -> (log-prob, rank)."""
    logprob: Callable[[Any], float]
    """A value -> its log-prob (the actual token's rank may be absent in JSON)."""
    k_name: str
    """How the caller names k in messages."""
    mismatch_note: str = ""
    """Appended to the actual-token error."""


_LOGPROB_FORM = _EntryForm(
    token=int,
    value=operator.attrgetter("logprob", "rank"),
    logprob=operator.attrgetter("logprob"),
    k_name="top_k",
    mismatch_note=": the actual-token entries of vLLM's prompt log-probs are not the next tokens",
)
"""vLLM's in-process dict form: int keys, ``Logprob`` values."""

_JSON_FORM = _EntryForm(
    token=int, value=operator.itemgetter("logprob", "rank"), logprob=operator.itemgetter("logprob"), k_name="k"
)
"""A ``/v1/completions`` answer: str keys, ``{"logprob", "rank", ...}`` values."""


def rows_from_flat(flat: FlatPromptLogprobs, sequence: Sequence[int], first_row: int, top_k: int) -> PromptRows:
    """Rows from vLLM's flat layout, with no per-entry Python: every position holds ``k + 1`` entries.

    Rows ``first_row .. len(sequence) - 2`` are entries ``first_row + 1 .. len(sequence) - 1``, the
    actual next token first. The layout is checked in bulk (offsets and actual tokens), so a change
    in vLLM raises instead of shifting rows.
    """
    n = num_rows(len(sequence)) - first_row
    width = top_k + 1
    first_entry = vllm_entry_for_row(first_row)
    last_entry = vllm_entry_for_row(num_rows(len(sequence)) - 1)
    if len(flat.start_indices) != len(sequence) or len(flat.end_indices) != len(sequence):
        raise PromptLogprobsError(
            f"{len(flat.start_indices)} prompt log-prob positions for a sequence of {len(sequence)} tokens"
        )
    lo, hi = flat.start_indices[first_entry], flat.end_indices[last_entry]
    starts = np.asarray(flat.start_indices[first_entry : last_entry + 1], dtype=np.int64)
    ends = np.asarray(flat.end_indices[first_entry : last_entry + 1], dtype=np.int64)
    expected = lo + width * np.arange(n, dtype=np.int64)
    if hi - lo != n * width or not (np.array_equal(starts, expected) and np.array_equal(ends, expected + width)):
        raise PromptLogprobsError(f"prompt log-prob positions do not hold {width} (1 + top_k) entries each")
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(n, width)
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(n, width)
    expected_ids = np.asarray(sequence[first_row + 1 :], dtype=np.int64)
    if not np.array_equal(ids[:, 0], expected_ids):
        raise PromptLogprobsError("the actual-token entries of vLLM's prompt log-probs are not the next tokens")
    ranks = np.asarray(flat.ranks[lo:hi], dtype=np.int32).reshape(n, width)[:, 0]
    return PromptRows(
        ids[:, 1:].astype(np.int32), np.ascontiguousarray(lps[:, 1:]), np.ascontiguousarray(lps[:, 0]), ranks
    )


class _RowLists:
    """Rows gathered as Python lists (list stores are cheaper than numpy item stores), made arrays once."""

    def __init__(self) -> None:
        self.ids: list[list[int]] = []
        self.lps: list[list[float]] = []
        self.target: list[float] = []
        self.ranks: list[int] = []

    def arrays(self, top_k: int) -> PromptRows:
        """The rows as arrays; ids int64 until the caller has checked them (any int fits, none wraps)."""
        n = len(self.ids)
        return PromptRows(
            np.asarray(self.ids, dtype=np.int64).reshape(n, top_k),
            np.asarray(self.lps, dtype=np.float32).reshape(n, top_k),
            np.asarray(self.target, dtype=np.float32),
            np.asarray(self.ranks, dtype=np.int32),
        )


def _read_positions(
    positions: Any,
    sequence: Sequence[int],
    first_row: int,
    top_k: int,
    form: _EntryForm,
    out: _RowLists,
    prompt: int | None = None,
    with_ranks: bool = True,
) -> None:
    """Append rows ``first_row ..`` of one sequence's dict-form positions to ``out``.

    A position's first key is the actual token, checked against the sequence; it has ``k + 1``
    keys when the actual token is outside the top-k and ``k`` when inside (the duplicate collapsed).
    Ranks 1..k give each entry its column; an unfilled column stays -1 (see :func:`_check_filled`).
    ``prompt`` is the sequence's index in a batched answer, named in messages.
    """
    where = "" if prompt is None else f"prompt {prompt} "
    if not isinstance(positions, list) or len(positions) != len(sequence):
        got = len(positions) if isinstance(positions, list) else positions
        head = "" if prompt is None else f"prompt {prompt}: "
        raise PromptLogprobsError(f"{head}{got} prompt_logprobs entries for {len(sequence)} tokens")
    token, value, logprob = form.token, form.value, form.logprob
    for j in range(first_row, num_rows(len(sequence))):
        entry = positions[vllm_entry_for_row(j)]
        if not isinstance(entry, dict) or not entry:
            raise PromptLogprobsError(f"{where}row {j}: no prompt log-probs ({type(entry).__name__} {entry!r:.40})")
        items = iter(entry.items())
        actual_key, actual = next(items)
        if token(actual_key) != sequence[j + 1]:
            raise PromptLogprobsError(
                f"{where}row {j}: first entry is token {actual_key}, the sequence has {sequence[j + 1]}"
                + form.mismatch_note
            )
        out.target.append(logprob(actual))
        if with_ranks:
            out.ranks.append(value(actual)[1])
        if len(entry) == top_k:  # the actual token is one of the top-k: place it too
            items = iter(entry.items())
        elif len(entry) != top_k + 1:
            raise PromptLogprobsError(f"{where}row {j}: {len(entry)} entries for {form.k_name}={top_k}")
        row_ids, row_lps = [-1] * top_k, [0.0] * top_k
        for key, val in items:
            lp, rank = value(val)
            if not 1 <= rank <= top_k:
                raise PromptLogprobsError(f"{where}row {j}: top-k entry with rank {rank}")
            row_ids[rank - 1], row_lps[rank - 1] = token(key), lp
        out.ids.append(row_ids)
        out.lps.append(row_lps)


def _check_filled(ids: np.ndarray) -> None:
    """Every top-k column placed: a duplicate rank leaves another one unfilled."""
    if (ids < 0).any():
        raise PromptLogprobsError("vLLM answer leaves top-k ranks unfilled (duplicate or missing ranks)")


def rows_from_dicts(positions: Any, sequence: Sequence[int], first_row: int, top_k: int) -> PromptRows:
    """Rows from vLLM's dict form (``list[None | dict[int, Logprob]]``), for vLLMs without flat mode."""
    out = _RowLists()
    _read_positions(positions, sequence, first_row, top_k, _LOGPROB_FORM, out)
    rows = out.arrays(top_k)
    _check_filled(rows.token_ids)
    return rows._replace(token_ids=rows.token_ids.astype(np.int32))


def rows_from_prompt_logprobs(prompt_logprobs: Any, sequence: Sequence[int], first_row: int, top_k: int) -> PromptRows:
    """Rows from either of vLLM's in-process forms (flat, or a list of dicts)."""
    if hasattr(prompt_logprobs, "start_indices"):
        return rows_from_flat(prompt_logprobs, sequence, first_row, top_k)
    return rows_from_dicts(prompt_logprobs, sequence, first_row, top_k)


def _choices_by_index(body: bytes, count: int) -> list[dict[str, Any] | None]:
    """The answer's choices in prompt order (a server may answer them in any order); None where missing."""
    try:
        choices = orjson.loads(body)["choices"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise PromptLogprobsError(f"vLLM answer is not a completions response: {exc!r}") from exc
    ordered: list[Any] = [None] * count
    for choice in choices:
        i = choice.get("index")
        if not isinstance(i, int) or not 0 <= i < count or ordered[i] is not None:
            raise PromptLogprobsError(f"vLLM answered choice index {i!r} for {count} prompts")
        ordered[i] = choice
    return ordered


def parse_completions_json(
    body: bytes,
    sequences: Sequence[Sequence[int]],
    first_rows: Sequence[int],
    top_k: int,
    vocab_size: int | None = None,
) -> tuple[TopkFrame, np.ndarray]:
    """A frame (ids, log-probs, offsets) and the target log-probs float32 [N] from a /v1/completions answer.

    ``choices[i].prompt_logprobs`` of prompt i holds rows ``first_rows[i] ..``; -9999.0 becomes -inf,
    and an id at or above ``vocab_size`` (when given) is refused.
    """
    choices = _choices_by_index(body, len(sequences))
    out = _RowLists()
    for b, (seq, first) in enumerate(zip(sequences, first_rows, strict=True)):
        choice = choices[b]
        if choice is None:
            raise PromptLogprobsError(f"vLLM answered no choice for prompt {b}")
        _read_positions(choice.get("prompt_logprobs"), seq, first, top_k, _JSON_FORM, out, b, with_ranks=False)
    rows = out.arrays(top_k)
    _check_filled(rows.token_ids)
    ids, lps, target = rows.token_ids, rows.logprobs, rows.target_logprobs
    if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
        raise PromptLogprobsError(f"vLLM returned token id {int(ids.max())} outside the vocabulary of {vocab_size}")
    lps[lps <= JSON_NEG_INF] = -np.inf
    target[target <= JSON_NEG_INF] = -np.inf
    frame = TopkFrame(
        token_ids=torch.from_numpy(ids.astype(np.int32)),
        logprobs=torch.from_numpy(lps),
        row_offsets=row_offsets([len(s) for s in sequences], first_rows),
        first_rows=torch.tensor(list(first_rows), dtype=torch.int64),
    )
    frame.validate()
    return frame, target


def json_floats(values: torch.Tensor) -> list:
    """A tensor as JSON numbers, -inf written as :data:`JSON_NEG_INF`."""
    return values.float().clamp_min(JSON_NEG_INF).tolist()


def prompt_logprobs_entries(
    sequence: Sequence[int],
    token_ids: torch.Tensor,
    logprobs: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_ranks: torch.Tensor | None,
    decode: Callable[[int], str | None],
) -> list[dict[str, dict[str, Any]] | None]:
    """One sequence's JSON ``prompt_logprobs`` from all its rows (``[L-1, k]`` ids and log-probs by rank).

    The actual token comes first with its log-prob and vocabulary rank (None where unknown), then the
    top-k not equal to it; ``k`` may be 0 (the actual token alone).
    """
    ids = token_ids.tolist()
    lps = json_floats(logprobs)
    t_lps = json_floats(target_logprobs)
    t_ranks: list[int | None] = [None] * len(ids) if target_ranks is None else target_ranks.tolist()
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for j, (row_ids, row_lps) in enumerate(zip(ids, lps, strict=True)):
        actual = sequence[vllm_entry_for_row(j)]
        entry = {str(actual): {"logprob": t_lps[j], "rank": t_ranks[j], "decoded_token": decode(actual)}}
        for rank, (tid, lp) in enumerate(zip(row_ids, row_lps, strict=True), start=1):
            if tid != actual:
                entry[str(tid)] = {"logprob": lp, "rank": rank, "decoded_token": decode(tid)}
        out.append(entry)
    return out
