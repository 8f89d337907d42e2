"""The engine interface: what the HTTP layer needs from any teacher backend."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.alignment import RowSpan, first_rows_of_spans, spans_from_first_rows
from shared.codec import TopkFrame
from shared.fingerprint import tokenizer_fingerprint
from teacher_service.engines.generation import Completion, GenerateJob


class EngineDeadError(RuntimeError):
    """The engine can no longer serve; only a restart of the service brings it back."""


@dataclass(frozen=True)
class ScoreJob:
    """One validated batch to score: the rows ``row_spans[b]`` of each sequence (spans as in
    :mod:`shared.alignment`), in frame order. An engine answers a frame carrying these spans."""

    sequences: list[list[int]]
    row_spans: list[list[RowSpan]]
    top_k: int
    want_target_logprobs: bool = False
    want_tail_logmass: bool = False
    """With ``want_target_logprobs`` the engine also fills ``target_ranks`` (1-based) where it can."""
    temperature: float = 1.0
    """Rows are ``log_softmax(logits / temperature)``, the tail exact at that temperature."""

    @classmethod
    def from_first_rows(
        cls,
        sequences: list[list[int]],
        first_rows: Sequence[int],
        top_k: int,
        want_target_logprobs: bool = False,
        want_tail_logmass: bool = False,
        temperature: float = 1.0,
    ) -> ScoreJob:
        """Rows ``first_rows[b] .. len(sequences[b]) - 2`` of each sequence: the one-span case."""
        spans = spans_from_first_rows([len(s) for s in sequences], first_rows)
        return cls(sequences, spans, top_k, want_target_logprobs, want_tail_logmass, temperature)

    @property
    def seq_lens(self) -> list[int]:
        return [len(s) for s in self.sequences]

    @property
    def first_rows(self) -> list[int]:
        """The frame's ``first_rows``: each sequence's first span start (L-1 for a sequence without spans)."""
        return first_rows_of_spans(self.seq_lens, self.row_spans)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


class TeacherEngine(abc.ABC):
    """A loaded teacher model that returns top-k log-probs per position, raw at the job's temperature
    (``log_softmax(logits / T)``; T = 1 by default)."""

    engine_name: str = "abstract"
    can_generate: bool = False
    """True when :meth:`generate` is implemented (/v1/completions with max_tokens > 1)."""
    batches_internally: bool = False
    """True when the engine schedules concurrent requests itself (vLLM); else the service micro-batches."""
    model_dir: str | None = None
    """Where the weights come from (``root`` in /v1/models); None for an engine without a model directory."""
    applies_temperature: bool = False
    """True when ``score`` honours ``ScoreJob.temperature``; else jobs at T != 1 are refused before they reach it."""

    def __init__(self, served_model_name: str) -> None:
        self.served_model_name = served_model_name

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Rows of the output embedding: the largest token id plus one the model accepts."""

    @property
    @abc.abstractmethod
    def tokenizer_fingerprint(self) -> str: ...

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> Any | None:
        """The served model's HF tokenizer, for text prompts and decoded tokens in vLLM-style answers."""
        return None

    async def start(self) -> None:
        """Load weights and warm up; the service reports ready only after this returns."""

    @abc.abstractmethod
    async def score(self, job: ScoreJob) -> TopkFrame:
        """Top-k rows of every span of every sequence, logprobs float32, sorted descending per row."""

    def check_health(self) -> None:
        """Raise :class:`EngineDeadError` once the engine can no longer serve (its worker processes died):
        ``/health`` then fails, so that the orchestrator restarts the service. An in-process engine lives
        and dies with the service."""

    async def close(self) -> None:
        """Release the engine's resources."""

    # --- generation (/v1/completions with max_tokens > 1)

    @property
    def max_total_tokens(self) -> int:
        """Most tokens of a prompt plus its completion (the model's context)."""
        return self.max_model_len

    async def generate(self, job: GenerateJob) -> list[list[Completion]]:
        """Per prompt, its ``job.n`` completions. Cancelling the call stops the work (the slot is not held on)."""
        raise NotImplementedError(f"the {self.engine_name} engine does not generate")


class ModelDirEngine(TeacherEngine):
    """An engine serving a Hugging Face model directory: the tokenizer (and its fingerprint) is read at
    construction, so the handshake never depends on the engine; vocabulary size and context length are
    set by ``start`` from the loaded model."""

    def __init__(self, model_dir: str | Path, served_model_name: str | None = None) -> None:
        from transformers import AutoTokenizer

        super().__init__(served_model_name or Path(model_dir).name)
        self.model_dir = str(model_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._fingerprint = tokenizer_fingerprint(self._tokenizer)
        self._vocab_size = 0
        self._max_len = 0

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def tokenizer_fingerprint(self) -> str:
        return self._fingerprint

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer
