"""Prompt/completion JSONL data: tokenized once, sharded per data-parallel rank, right-padded batches."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.alignment import pad_sequences, padded_positions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    prompt_len: int

    @property
    def first_row(self) -> int:
        """Row predicting the first completion token (rows before it are prompt rows)."""
        return self.prompt_len - 1


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    first_rows: list[int]
    sequences: list[list[int]]
    data_state: dict[str, int] = field(default_factory=dict)
    """Position of the data iterator just after this batch (what a checkpoint must record)."""

    @property
    def num_target_tokens(self) -> int:
        return sum(len(s) - 1 - f for s, f in zip(self.sequences, self.first_rows, strict=True))

    def row_index(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, position) index of every loss row (completion rows only), in the teacher frame's order."""
        b_idx, t_idx = padded_positions(self.attention_mask, self.first_rows)
        return b_idx.to(device), t_idx.to(device)

    def prompts(self) -> list[list[int]]:
        """Each sequence's prompt: the tokens before its first completion token."""
        return [s[: f + 1] for s, f in zip(self.sequences, self.first_rows, strict=True)]

    def with_completions(self, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
        """This batch's (possibly shortened) prompts with generated completions; the data position is kept."""
        examples = [Example(p + c, len(p)) for p, c in zip(prompts, completions, strict=True)]
        batch = collate(examples, pad_id)
        batch.data_state = self.data_state
        return batch


def load_jsonl(path: str | Path, tokenizer, max_length: int, max_completion_length: int | None = None) -> list[Example]:
    """Tokenize ``{"prompt", "completion"}`` rows; the completion ends with EOS and is what the loss sees.

    ``max_length`` bounds prompt + completion. The completion is cut to
    ``max_completion_length`` first, then the prompt keeps its last tokens.
    """
    examples: list[Example] = []
    with Path(path).open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "completion" not in row:
                raise ValueError(f"{path}:{line_no}: each line needs 'prompt' and 'completion' fields")
            prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
            completion = [*tokenizer(row["completion"], add_special_tokens=False).input_ids, tokenizer.eos_token_id]
            if max_completion_length is not None:
                completion = completion[:max_completion_length]
            room = max_length - len(completion)
            prompt = prompt[-room:] if room > 0 else []
            if not prompt:
                raise ValueError(f"{path}:{line_no}: no room for the prompt inside max_length={max_length}")
            examples.append(Example(prompt + completion, len(prompt)))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def collate(examples: list[Example], pad_id: int) -> Batch:
    ids, mask = pad_sequences([e.input_ids for e in examples], pad_id)
    return Batch(ids, mask, [e.first_row for e in examples], [e.input_ids for e in examples])


class ShardedBatches:
    """Endless micro-batches for one data-parallel rank; each epoch is a seeded permutation.

    ``position`` (epoch, index) is all the state needed to resume exactly.
    """

    def __init__(
        self, examples: list[Example], micro_batch: int, rank: int, world: int, seed: int, pad_id: int
    ) -> None:
        per_rank = len(examples) // world
        if per_rank < micro_batch:
            raise ValueError(
                f"{len(examples)} examples over {world} ranks is fewer than one micro-batch of {micro_batch}"
            )
        self.examples, self.micro_batch, self.rank, self.world = examples, micro_batch, rank, world
        self.seed, self.pad_id = seed, pad_id
        self.epoch, self.index = 0, 0

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.examples), generator=gen).tolist()
        usable = len(perm) - len(perm) % self.world
        return perm[self.rank : usable : self.world]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = self._order()
            while self.index + self.micro_batch <= len(order):
                chunk = order[self.index : self.index + self.micro_batch]
                self.index += self.micro_batch
                batch = collate([self.examples[i] for i in chunk], self.pad_id)
                batch.data_state = self.state_dict()
                yield batch
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
