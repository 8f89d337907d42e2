"""Training examples (token ids and the row spans of their loss) and the right-padded micro-batches made of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.alignment import RowSpan, pad_sequences, span_positions, span_rows


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    row_spans: tuple[RowSpan, ...]
    """Rows of the loss (row j predicts token j+1): one span per assistant turn, or one per completion."""
    teacher: str | None = None
    """The named teacher (``--teacher``) that scores it; None: the run's one teacher."""

    @classmethod
    def completion(cls, input_ids: list[int], prompt_len: int, teacher: str | None = None) -> Example:
        """A prompt of ``prompt_len`` tokens followed by a completion that is trained on in full."""
        return cls(list(input_ids), ((prompt_len - 1, len(input_ids) - 1),), teacher)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    row_spans: list[list[RowSpan]]
    sequences: list[list[int]]
    data_state: dict[str, int] = field(default_factory=dict)
    """Position of the data iterator just after this batch (what a checkpoint must record)."""
    teachers: list[str | None] = field(default_factory=list)
    """Each sequence's named teacher (None: the run's one teacher); empty: all None."""

    @property
    def num_target_tokens(self) -> int:
        return sum(span_rows(spans) for spans in self.row_spans)

    def row_index(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, position) index of every loss row, in the teacher frame's order."""
        b_idx, t_idx = span_positions(self.attention_mask, self.row_spans)
        return b_idx.to(device), t_idx.to(device)

    def prompts(self) -> list[list[int]]:
        """Each sequence up to its first trained token: what generation continues from."""
        return [s[: spans[0][0] + 1] for s, spans in zip(self.sequences, self.row_spans, strict=True)]

    def with_completions(self, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
        """These prompts with generated completions, trained on in full; the data position is kept."""
        teachers = self.teachers or [None] * len(prompts)
        batch = collate(
            [Example.completion(p + c, len(p), t) for p, c, t in zip(prompts, completions, teachers, strict=True)],
            pad_id,
        )
        batch.data_state = self.data_state
        return batch


def collate(examples: list[Example], pad_id: int) -> Batch:
    ids, mask = pad_sequences([e.input_ids for e in examples], pad_id)
    return Batch(
        ids,
        mask,
        [list(e.row_spans) for e in examples],
        [e.input_ids for e in examples],
        teachers=[e.teacher for e in examples],
    )
