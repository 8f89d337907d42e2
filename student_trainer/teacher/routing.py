"""Named teachers (``--teacher math=URL --teacher code=URL``): each micro-batch row goes to the teacher it names.

Each teacher is a :class:`~.pool.TeacherPool` (its own replicas and handshake). A micro-batch that mixes
teachers sends one request per teacher, concurrently, and the answers are put back in the batch's order,
so the step sees one frame whose rows line up with its sequences as with a single teacher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from shared.codec import TopkFrame
from student_trainer.teacher.base import AsyncTeacherClient, ServedModel
from student_trainer.teacher.errors import TeacherError, TeacherMismatchError


class TeacherRouter:
    """Teacher name -> its client; a single teacher also takes the rows that name none."""

    def __init__(self, teachers: dict[str, AsyncTeacherClient]) -> None:
        if not teachers:
            raise ValueError("no teacher")
        self.teachers = teachers
        self.default = next(iter(teachers)) if len(teachers) == 1 else None

    async def check_compatible(
        self, vocab_size: int, tokenizer_fingerprint: str, top_k: int, probe: tuple[str, list[int]] | None = None
    ) -> dict[str, ServedModel]:
        """Every teacher's handshake (concurrently); the first refusal is raised, naming its teacher."""
        names = list(self.teachers)
        results = await asyncio.gather(
            *(self.teachers[n].check_compatible(vocab_size, tokenizer_fingerprint, top_k, probe) for n in names),
            return_exceptions=True,
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, TeacherMismatchError) and len(names) > 1:
                raise TeacherMismatchError(f"teacher {name!r}: {result}") from result
            if isinstance(result, BaseException):
                raise result
        return {n: r for n, r in zip(names, results, strict=True) if not isinstance(r, BaseException)}

    def _client(self, name: str | None) -> AsyncTeacherClient:
        key = self.default if name is None else name
        if key is None or key not in self.teachers:
            raise TeacherError(f"no teacher named {name!r} (teachers: {', '.join(self.teachers)})")
        return self.teachers[key]

    async def topk_logprobs(
        self,
        names: Sequence[str | None],
        sequences: Sequence[Sequence[int]],
        top_k: int,
        *,
        row_spans: Sequence[Sequence[tuple[int, int]]],
        return_tail_logmass: bool = False,
        **options: Any,
    ) -> TopkFrame:
        """The rows of ``row_spans`` of every sequence, each from its teacher; one frame in the batch's order."""
        groups: dict[str, list[int]] = {}
        for b in range(len(sequences)):
            name = names[b] if b < len(names) else None
            key = self.default if name is None else name
            self._client(key)
            assert key is not None
            groups.setdefault(key, []).append(b)
        if len(groups) == 1:
            ((name, _),) = groups.items()
            return await self.teachers[name].topk_logprobs(
                sequences, top_k, row_spans=row_spans, return_tail_logmass=return_tail_logmass, **options
            )
        order = list(groups)
        frames = await asyncio.gather(
            *(
                self.teachers[n].topk_logprobs(
                    [sequences[b] for b in groups[n]],
                    top_k,
                    row_spans=[row_spans[b] for b in groups[n]],
                    return_tail_logmass=return_tail_logmass,
                    **options,
                )
                for n in order
            )
        )
        where = {b: (frame, i) for n, frame in zip(order, frames, strict=True) for i, b in enumerate(groups[n])}
        parts = [where[b][0].select(where[b][1], where[b][1] + 1) for b in range(len(sequences))]
        joined = TopkFrame.concat(parts)
        joined.metadata = {"model": ",".join(sorted({f.metadata.get("model", "") for f in frames}))}
        return joined

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.teachers.values()), return_exceptions=True)
