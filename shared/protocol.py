"""Wire schemas shared by the teacher service and the student's client.

Token ids go over the wire, never text: re-tokenizing on the other side is the
most common source of silent misalignment in distillation setups.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from shared.alignment import RowSpan, as_row_spans, check_row_spans, first_rows_of_spans, spans_from_first_rows

FORMAT_VERSION = 3
"""The newest binary frame layout: bumped whenever it changes incompatibly, and published in the handshake.

2 adds row spans (``row_spans``, ``span_offsets``); 3 adds the compact encodings a request opts into
(``ids_encoding="packed"``, ``logprobs_dtype="q8"``). A frame is written at the lowest version that holds it:
the answer to a request without ``row_spans`` is still a version 1 frame, which a client that reads only
version 1 decodes as before.
"""

FORMAT_VERSIONS: tuple[int, ...] = (1, 2, 3)
"""Frame versions this code reads."""

TOPK_MEDIA_TYPE = "application/vnd.gkd-topk+safetensors"
"""Media type of the binary `/v1/topk_logprobs` answer (a safetensors byte frame)."""

LogprobDtype = Literal["float16", "bfloat16", "float32", "q8"]
"""q8: 8-bit per-row quantized log-probs (format 3), error at most (row top - row lowest) / 508; see shared.packing."""
IdsEncoding = Literal["int32", "packed"]


class TopkRequest(BaseModel):
    """Body of `POST /v1/topk_logprobs`: one request per micro-batch."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None,
        description="Served model name; when given it must match the teacher's.",
    )
    sequences: list[list[StrictInt]] = Field(
        min_length=1,
        description="Token-id sequences, each at least 2 tokens long (1 token has no next-token row).",
    )
    top_k: int = Field(ge=1, description="Number of (id, logprob) pairs returned per row.")
    first_rows: list[int] | None = Field(
        default=None,
        description=(
            "Per sequence, the first row to compute (prompt length - 1 for completion-only "
            "losses). Rows before it are neither computed nor sent. Default 0. The one-span case of row_spans."
        ),
    )
    row_spans: list[list[list[StrictInt]]] | None = Field(
        default=None,
        description=(
            "Per sequence, the [start, end) row ranges to compute and send (one per assistant turn of a "
            "conversation): ascending, disjoint, non-empty, inside the rows [0, L-1) of a sequence of L tokens; "
            "[] for none. An alternative to first_rows. The answer is a format 2 frame carrying the spans."
        ),
    )
    logprobs_dtype: LogprobDtype = Field(
        default="float16",
        description=(
            "Dtype of `logprobs` in the frame; q8: 8-bit per row (format 3), each log-prob within half a step "
            "(row top - row lowest) / 508 of its value; offered where the handshake lists it in logprobs_dtypes."
        ),
    )
    ids_encoding: IdsEncoding = Field(
        default="int32",
        description=(
            "int32 token ids, or packed: in ceil(log2 vocab_size) bits, at least 16 (a format 3 frame); offered "
            "where the handshake lists it in ids_encodings."
        ),
    )
    return_target_logprobs: bool = Field(
        default=False, description="Add `target_logprobs`: log-prob of the actual next token per row."
    )
    return_tail_logmass: bool = Field(
        default=False, description="Add `tail_logmass`: log of the probability mass outside the top-k per row."
    )
    temperature: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Rows are log_softmax(logits / temperature), the tail mass exact at that temperature; default 1 "
            "(raw log-probs). Needs a teacher whose handshake says applies_temperature."
        ),
    )

    @field_validator("sequences")
    @classmethod
    def _at_least_two_tokens(cls, sequences: list[list[int]]) -> list[list[int]]:
        for i, seq in enumerate(sequences):
            if len(seq) < 2:
                raise ValueError(f"sequences[{i}] has {len(seq)} token(s); at least 2 are needed")
        return sequences

    @field_validator("first_rows")
    @classmethod
    def _rows_inside_sequences(cls, first_rows: list[int] | None, info: ValidationInfo) -> list[int] | None:
        sequences = info.data.get("sequences")
        if first_rows is None or sequences is None:
            return first_rows
        if len(first_rows) != len(sequences):
            raise ValueError(f"first_rows has {len(first_rows)} entries for {len(sequences)} sequences")
        for i, (row, seq) in enumerate(zip(first_rows, sequences, strict=True)):
            if not 0 <= row <= len(seq) - 2:
                raise ValueError(
                    f"first_rows[{i}]={row} is outside [0, {len(seq) - 2}] for a sequence of {len(seq)} tokens"
                )
        return first_rows

    @field_validator("row_spans")
    @classmethod
    def _spans_inside_sequences(
        cls, row_spans: list[list[list[int]]] | None, info: ValidationInfo
    ) -> list[list[list[int]]] | None:
        if row_spans is None:
            return None
        if info.data.get("first_rows") is not None:
            raise ValueError("first_rows and row_spans are alternatives: send one of them")
        sequences = info.data.get("sequences")
        if sequences is None:
            return row_spans
        if len(row_spans) != len(sequences):
            raise ValueError(f"row_spans has {len(row_spans)} entries for {len(sequences)} sequences")
        for i, (spans, seq) in enumerate(zip(row_spans, sequences, strict=True)):
            problem = check_row_spans(spans, len(seq))
            if problem is not None:
                raise ValueError(f"row_spans[{i}]: {problem}")
        return row_spans

    def resolved_row_spans(self) -> list[list[RowSpan]]:
        """The rows asked for, as spans per sequence, whichever form the request used (default: all rows)."""
        if self.row_spans is not None:
            return as_row_spans(self.row_spans)
        firsts = self.first_rows if self.first_rows is not None else [0] * len(self.sequences)
        return spans_from_first_rows([len(s) for s in self.sequences], firsts)

    def resolved_temperature(self) -> float:
        """The temperature the rows are at (1 when the request does not say)."""
        return 1.0 if self.temperature is None else self.temperature

    def resolved_first_rows(self) -> list[int]:
        """The answer's ``first_rows``: ``first_rows`` as sent, or each sequence's first span start (L-1: none)."""
        return first_rows_of_spans([len(s) for s in self.sequences], self.resolved_row_spans())


class RequestLimits(BaseModel):
    max_top_k: int
    max_sequences: int
    max_tokens: int
    max_body_bytes: int


class TeacherInfo(BaseModel):
    """Handshake: what a client must check before it trains against this teacher."""

    model: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_top_k: int
    limits: RequestLimits
    logprob_mode: Literal["raw"] = Field(
        default="raw",
        description="Log-probs are raw model log-probs, at temperature 1 unless the request names a temperature.",
    )
    applies_temperature: bool = Field(
        default=False,
        description="The teacher computes rows at a requested temperature (else: temperature 1 only).",
    )
    format_version: int = Field(
        default=FORMAT_VERSION,
        description="Newest frame version the teacher writes; 2 and above take row_spans.",
    )
    engine: str
    ids_encodings: list[IdsEncoding] = Field(
        default=["int32"], description="ids_encoding values this teacher answers (older teachers: int32 only)."
    )
    logprobs_dtypes: list[LogprobDtype] = Field(
        default=["float16", "bfloat16", "float32"], description="logprobs_dtype values this teacher answers."
    )
    model_revision: str | None = Field(
        default=None,
        description="What identifies the served weights (--model-revision, or a digest of the model directory's "
        "config and sampled weight bytes): part of every teacher-cache key.",
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gkd-teacher"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """The one error shape (OpenAI/vLLM style) for every failure."""

    error: ErrorDetail


class SequenceTopk(BaseModel):
    """JSON form of one sequence's rows, span by span (for humans and curl; the binary frame is the default)."""

    first_row: int
    row_spans: list[list[int]] | None = Field(
        default=None, description="This sequence's [start, end) row spans, when the request named spans."
    )
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    target_logprobs: list[float] | None = None
    tail_logmass: list[float] | None = None


class TopkJsonResponse(BaseModel):
    model: str
    top_k: int
    vocab_size: int
    format_version: int = Field(default=1, description="As the binary frame's: 2 when the rows come with spans.")
    temperature: float = Field(default=1.0, description="The rows are log_softmax(logits / temperature).")
    sequences: list[SequenceTopk]
