"""Endless micro-batches for one data-parallel rank, with the position a checkpoint needs to resume exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from shared.dataset_formats import DataError  # one class for loading (shared) and batching errors
from student_trainer.data.batch import Batch, Example, collate

__all__ = ["DataError", "ShardedBatches", "StreamingBatches"]


class ShardedBatches:
    """An in-memory (or memory-mapped) dataset, each epoch a seeded permutation split over the ranks.

    With ``lengths`` (``--group_by_length``) each rank's share is ordered as Hugging Face Trainer's
    length-grouped sampler orders it: random mega-batches, each sorted by length, so a micro-batch
    pads less; the longest micro-batch comes first, so memory runs out at once or not at all.
    ``(epoch, index)`` is all the state needed to resume exactly.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        pad_id: int,
        lengths: Sequence[int] | None = None,
    ) -> None:
        per_rank = len(examples) // world
        if per_rank < micro_batch:
            raise DataError(
                f"{len(examples)} examples over {world} ranks is fewer than one micro-batch of {micro_batch}"
            )
        self.examples, self.micro_batch, self.rank, self.world = examples, micro_batch, rank, world
        self.seed, self.pad_id, self.lengths = seed, pad_id, lengths
        self.epoch, self.index = 0, 0

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.examples), generator=gen).tolist()
        usable = len(perm) - len(perm) % self.world
        mine = perm[self.rank : usable : self.world]
        if self.lengths is None:
            return mine
        from transformers.trainer_pt_utils import get_length_grouped_indices

        lengths = [self.lengths[i] for i in mine]
        return [mine[i] for i in get_length_grouped_indices(lengths, self.micro_batch, generator=gen)]

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

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class StreamingBatches:
    """Micro-batches read from a streamed dataset (``--streaming``), already split to this rank and encoded.

    The stream is read in its stored order (a shuffle buffer would not survive a resume); each batch
    records the stream's own ``state_dict``, so a resumed run continues after the last batch consumed.
    Invalid rows are found as they are read: they stop training, or are skipped and counted.
    """

    def __init__(self, stream: Any, micro_batch: int, pad_id: int, source: str, drop_invalid: bool = False) -> None:
        self.stream, self.micro_batch, self.pad_id = stream, micro_batch, pad_id
        self.source, self.drop_invalid = source, drop_invalid
        self.epoch, self.dropped = 0, 0
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Batch]:
        while True:
            self.stream.set_epoch(self.epoch)
            resumed = self._resume is not None
            if self._resume is not None:
                self.stream.load_state_dict(self._resume)
                self._resume = None
            pending: list[Example] = []
            batches = 0
            for row in self.stream:
                if row["error"] is not None:
                    if not self.drop_invalid:
                        raise DataError(f"{self.source} row {row['row'] + 1}: {row['error']}")
                    self.dropped += 1
                    continue
                pending.append(Example(row["input_ids"], tuple(tuple(s) for s in row["row_spans"])))
                if len(pending) == self.micro_batch:
                    batch = collate(pending, self.pad_id)
                    batch.data_state = {"epoch": self.epoch, "stream": self.stream.state_dict()}
                    pending, batches = [], batches + 1
                    yield batch
            if batches == 0 and not resumed:  # a whole epoch without one batch: it would loop forever
                raise DataError(f"{self.source}: the stream holds fewer valid examples than one micro-batch")
            self.epoch += 1

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._resume = int(state["epoch"]), state["stream"]
