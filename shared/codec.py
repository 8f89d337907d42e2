"""The binary `/v1/topk_logprobs` frame: a safetensors byte string with ragged rows.

Rows of all sequences are concatenated (no padding bytes); ``row_offsets[b]`` to
``row_offsets[b+1]`` are sequence b's rows, and ``first_rows[b]`` says which row
index (in the position convention of :mod:`shared.alignment`) the first of them is.

Format 1 holds, per sequence, one contiguous block of rows from ``first_rows[b]`` on.
Format 2 adds row spans, for losses over several turns of a conversation: ``row_spans``
int64 [S, 2] and ``span_offsets`` int64 [B+1]; sequence b's spans are
``row_spans[span_offsets[b]:span_offsets[b+1]]`` and its rows are theirs, span by span.
A frame is written at the lowest version that holds it (a frame without spans is format 1:
the tensors and metadata a format 1 writer sends), so a client that reads only format 1
keeps working for requests without spans.

Format 3 adds compact encodings a request opts into (:mod:`shared.packing`): packed ids instead of
``token_ids`` (``token_ids_low`` uint16 [N, k], the low 16 bits of each id, and ``token_ids_high`` uint8, the
bits above them packed at ``id_bits - 16`` bits, absent when ``id_bits`` <= 16; ``id_bits`` is named in the
metadata), and/or ``logprobs_q8`` uint8 [N, k] with ``logprobs_top`` and ``logprobs_step`` float32 [N] instead
of ``logprobs``. The first format 3 frames carried the whole ids in one bit stream, ``token_ids_packed`` uint8;
decoding still reads them (teacher caches hold them).
Either makes the frame format 3; decoding unpacks them into the same :class:`TopkFrame` (int32 ids;
float32 log-probs from q8), so nothing after the decoder knows how the frame travelled.

Encoding uses the safetensors library; decoding parses the header once and returns
zero-copy views over the received bytes, which ``safetensors.torch.load`` (it copies
every tensor and drops the metadata) does not offer for in-memory buffers.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from safetensors.torch import save

from shared import packing
from shared.alignment import RowSpan, first_rows_of_spans, rows_of_spans, span_row_offsets
from shared.protocol import FORMAT_VERSIONS

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U16": torch.uint16,
    "U8": torch.uint8,
}
LOGPROB_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


_EXTRAS = ("target_logprobs", "tail_logmass", "target_ranks")
_SPAN_TENSORS = ("row_spans", "span_offsets")
_Q8_TENSORS = ("logprobs_q8", "logprobs_top", "logprobs_step")
IDS_ENCODINGS = ("int32", "packed")
"""How token ids travel: int32 (zero-copy), or packed in ceil(log2 V) bits, at least 16 (format 3)."""
_PACKED_IDS = ("token_ids_low", "token_ids_high", "token_ids_packed")


def _joined_offsets(offsets: list[torch.Tensor]) -> torch.Tensor:
    """Ragged offsets of consecutive groups joined: each group's shifted by the items of the groups before it."""
    out, base = [offsets[0]], int(offsets[0][-1])
    for o in offsets[1:]:
        out.append(o[1:] + base)
        base += int(o[-1])
    return torch.cat(out)


def _pack_spans(row_spans: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_spans int64 [S, 2], span_offsets int64 [B+1]) of spans per sequence."""
    flat = [[int(start), int(end)] for spans in row_spans for start, end in spans]
    offsets = torch.zeros(len(row_spans) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(spans) for spans in row_spans], dtype=torch.int64), 0)
    return torch.tensor(flat, dtype=torch.int64).reshape(-1, 2), offsets


class FrameError(ValueError):
    """The bytes are not a valid top-k frame."""


@dataclass
class TopkFrame:
    """Top-k teacher rows for a batch of sequences, in ragged layout.

    token_ids: int32 [N, k]; logprobs: float [N, k] sorted descending per row;
    row_offsets: int64 [B+1]; first_rows: int64 [B]; optional per-row extras
    target_logprobs and tail_logmass: float32 [N]; target_ranks int32 [N] (1-based vocabulary
    rank of the actual next token, used by the vLLM-compatible JSON answer); optional
    row_spans int64 [S, 2] and span_offsets int64 [B+1] (both or neither: format 2).
    :meth:`spans` gives each sequence's spans either way.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    row_offsets: torch.Tensor
    first_rows: torch.Tensor
    target_logprobs: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    row_spans: torch.Tensor | None = None
    span_offsets: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_spans(
        cls,
        token_ids: torch.Tensor,
        logprobs: torch.Tensor,
        row_spans: Sequence[Sequence[RowSpan]],
        seq_lens: Sequence[int],
        *,
        target_logprobs: torch.Tensor | None = None,
        tail_logmass: torch.Tensor | None = None,
        target_ranks: torch.Tensor | None = None,
        metadata: dict[str, str] | None = None,
    ) -> TopkFrame:
        """A frame carrying ``row_spans``, from the rows of all spans in frame order (offsets and first rows
        follow from the spans; ``seq_lens`` gives a sequence without spans its first row, L-1)."""
        packed, offsets = _pack_spans(row_spans)
        return cls(
            token_ids=token_ids,
            logprobs=logprobs,
            row_offsets=span_row_offsets(row_spans),
            first_rows=torch.tensor(first_rows_of_spans(seq_lens, row_spans), dtype=torch.int64),
            target_logprobs=target_logprobs,
            tail_logmass=tail_logmass,
            target_ranks=target_ranks,
            row_spans=packed,
            span_offsets=offsets,
            metadata=dict(metadata or {}),
        )

    @classmethod
    def from_blocks(
        cls,
        block: TopkFrame,
        row_spans: Sequence[Sequence[RowSpan]],
        seq_lens: Sequence[int],
    ) -> TopkFrame:
        """The rows ``row_spans`` names, cut out of rows computed as contiguous blocks: ``block`` is a frame
        without spans holding, for each sequence that has spans (in order; a scorer sends no others), rows
        from its ``first_rows`` on through its last span. What engines that score whole prompts compute."""
        if block.has_spans:
            raise ValueError("from_blocks cuts spans out of a frame without spans")
        with_rows = [spans for spans in row_spans if spans]
        if block.num_sequences != len(with_rows):
            raise ValueError(f"{block.num_sequences} blocks of rows for {len(with_rows)} sequences with spans")
        counts = (block.row_offsets[1:] - block.row_offsets[:-1]).tolist()
        idx = rows_of_spans(with_rows, block.first_rows.tolist(), counts)

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return cls.from_spans(
            block.token_ids[idx],
            block.logprobs[idx],
            row_spans,
            seq_lens,
            target_logprobs=rows(block.target_logprobs),
            tail_logmass=rows(block.tail_logmass),
            target_ranks=rows(block.target_ranks),
            metadata=block.metadata,
        )

    @property
    def num_sequences(self) -> int:
        return int(self.row_offsets.numel()) - 1

    @property
    def top_k(self) -> int:
        return int(self.token_ids.shape[1])

    @property
    def has_spans(self) -> bool:
        return self.row_spans is not None

    @property
    def format_version(self) -> int:
        """The frame version that holds this frame: 2 with spans, else 1 (what a format 1 reader decodes)."""
        return 2 if self.has_spans else 1

    def rows(self, b: int) -> slice:
        return slice(int(self.row_offsets[b]), int(self.row_offsets[b + 1]))

    def spans(self) -> list[list[RowSpan]]:
        """Each sequence's row spans: carried (format 2), or its one block ``first_rows[b]..`` (format 1)."""
        if self.row_spans is not None and self.span_offsets is not None:
            pairs = [(int(start), int(end)) for start, end in self.row_spans.tolist()]
            offsets = self.span_offsets.tolist()
            return [pairs[offsets[b] : offsets[b + 1]] for b in range(self.num_sequences)]
        counts = (self.row_offsets[1:] - self.row_offsets[:-1]).tolist()
        return [[(f, f + c)] if c > 0 else [] for f, c in zip(self.first_rows.tolist(), counts, strict=True)]

    def with_spans(self) -> TopkFrame:
        """This frame carrying its spans (format 2), as a request by ``row_spans`` is answered."""
        if self.has_spans:
            return self
        packed, offsets = _pack_spans(self.spans())
        return replace(self, row_spans=packed, span_offsets=offsets)

    def without_spans(self) -> TopkFrame:
        """This frame as format 1, as a request by ``first_rows`` is answered; one span per sequence at most."""
        if self.span_offsets is None:
            return self
        most = int((self.span_offsets[1:] - self.span_offsets[:-1]).max()) if self.num_sequences else 0
        if most > 1:
            raise FrameError(f"a sequence has {most} row spans: format 1 holds one block of rows per sequence")
        return replace(self, row_spans=None, span_offsets=None)

    def select(self, lo: int, hi: int, top_k: int | None = None) -> TopkFrame:
        """Sequences ``lo:hi`` (and the first ``top_k`` columns) as a frame of their own.

        Fewer columns move their mass into ``tail_logmass``, which stays the mass outside the kept top-k.
        """
        r0, r1 = int(self.row_offsets[lo]), int(self.row_offsets[hi])
        k = self.top_k if top_k is None else top_k

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[r0:r1]

        tail = rows(self.tail_logmass)
        if tail is not None and k < self.top_k:
            # the columns dropped from the top-k now belong to the tail
            dropped = self.logprobs[r0:r1, k:].float()
            tail = torch.logsumexp(torch.cat([tail.float().unsqueeze(-1), dropped], dim=-1), dim=-1)
        row_spans = span_offsets = None
        if self.row_spans is not None and self.span_offsets is not None:
            s0, s1 = int(self.span_offsets[lo]), int(self.span_offsets[hi])
            row_spans, span_offsets = self.row_spans[s0:s1], self.span_offsets[lo : hi + 1] - s0
        return TopkFrame(
            token_ids=self.token_ids[r0:r1, :k],
            logprobs=self.logprobs[r0:r1, :k],
            row_offsets=self.row_offsets[lo : hi + 1] - r0,
            first_rows=self.first_rows[lo:hi],
            target_logprobs=rows(self.target_logprobs),
            tail_logmass=tail,
            target_ranks=rows(self.target_ranks),
            row_spans=row_spans,
            span_offsets=span_offsets,
            metadata=dict(self.metadata),
        )

    @staticmethod
    def concat(parts: list[TopkFrame]) -> TopkFrame:
        """Frames of consecutive sequence groups joined into one (offsets shifted, extras kept if all have them;
        spans carried if any part carries them)."""
        if len(parts) == 1:
            return parts[0]
        span_offsets = None
        if any(p.has_spans for p in parts):
            parts = [p.with_spans() for p in parts]
            span_offsets = _joined_offsets([p.span_offsets for p in parts if p.span_offsets is not None])

        def cat(name: str) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if any(t is None for t in tensors) else torch.cat(tensors)

        return TopkFrame(
            token_ids=torch.cat([p.token_ids for p in parts]),
            logprobs=torch.cat([p.logprobs for p in parts]),
            row_offsets=_joined_offsets([p.row_offsets for p in parts]),
            first_rows=torch.cat([p.first_rows for p in parts]),
            target_logprobs=cat("target_logprobs"),
            tail_logmass=cat("tail_logmass"),
            target_ranks=cat("target_ranks"),
            row_spans=cat("row_spans"),
            span_offsets=span_offsets,
            metadata=dict(parts[0].metadata),
        )

    def validate(self) -> None:
        n = int(self.token_ids.shape[0])
        if self.token_ids.dim() != 2 or self.logprobs.shape != self.token_ids.shape:
            raise FrameError(
                f"token_ids {tuple(self.token_ids.shape)} and logprobs {tuple(self.logprobs.shape)} differ"
            )
        if self.row_offsets.numel() < 1 or int(self.row_offsets[0]) != 0 or int(self.row_offsets[-1]) != n:
            raise FrameError(f"row_offsets must start at 0 and end at {n} rows")
        if self.first_rows.numel() != self.num_sequences:
            raise FrameError(f"{self.first_rows.numel()} first_rows for {self.num_sequences} sequences")
        if self.row_offsets.numel() > 1 and bool((self.row_offsets[1:] < self.row_offsets[:-1]).any()):
            raise FrameError("row_offsets decrease")
        for name in _EXTRAS:
            extra = getattr(self, name)
            if extra is not None and tuple(extra.shape) != (n,):
                raise FrameError(f"{name} has shape {tuple(extra.shape)}, expected ({n},)")
        self._validate_spans()

    def _validate_spans(self) -> None:
        """Spans ascending, disjoint and non-empty per sequence, holding exactly its rows, the first at first_rows."""
        spans, offsets = self.row_spans, self.span_offsets
        if spans is None and offsets is None:
            return
        if spans is None or offsets is None:
            raise FrameError("row_spans and span_offsets come together")
        b = self.num_sequences
        if spans.dim() != 2 or spans.shape[1] != 2:
            raise FrameError(f"row_spans has shape {tuple(spans.shape)}, expected (S, 2)")
        s = int(spans.shape[0])
        if tuple(offsets.shape) != (b + 1,) or int(offsets[0]) != 0 or int(offsets[-1]) != s:
            raise FrameError(f"span_offsets must have {b + 1} entries from 0 to {s} spans")
        per_seq = offsets[1:] - offsets[:-1]
        if bool((per_seq < 0).any()):
            raise FrameError("span_offsets decrease")
        starts, ends = spans[:, 0].long(), spans[:, 1].long()
        if bool((starts < 0).any()) or bool((ends <= starts).any()):
            raise FrameError("a row span is empty or starts before row 0")
        seq_of_span = torch.repeat_interleave(torch.arange(b), per_seq)
        same_seq = seq_of_span[1:] == seq_of_span[:-1]
        if bool((same_seq & (starts[1:] < ends[:-1])).any()):
            raise FrameError("row spans of a sequence overlap or do not ascend")
        cum = torch.zeros(s + 1, dtype=torch.int64)
        cum[1:] = torch.cumsum(ends - starts, 0)
        span_rows = cum[offsets[1:].long()] - cum[offsets[:-1].long()]
        if not torch.equal(span_rows, (self.row_offsets[1:] - self.row_offsets[:-1]).long()):
            raise FrameError(f"row spans hold {span_rows.tolist()} rows per sequence, row_offsets another count")
        has = per_seq > 0
        if not torch.equal(self.first_rows[has].long(), starts[offsets[:-1][has].long()]):
            raise FrameError("first_rows differ from the start of each sequence's first span")


def encode_frame(
    frame: TopkFrame, *, ids_encoding: str = "int32", vocab_size: int | None = None, logprobs_q8: bool = False
) -> bytes:
    """The frame's bytes, at the lowest format that holds them: 3 with packed ids or q8 log-probs, else 2 when
    it carries spans, else 1. ``ids_encoding="packed"`` needs ``vocab_size`` (ids take ceil(log2 V) bits)."""
    frame.validate()
    if ids_encoding not in IDS_ENCODINGS:
        raise ValueError(f"ids_encoding {ids_encoding!r}; expected one of {IDS_ENCODINGS}")
    metadata = dict(frame.metadata)
    tensors: dict[str, torch.Tensor] = {}
    if ids_encoding == "packed":
        if vocab_size is None:
            raise ValueError("packed ids need the vocabulary size")
        bits = packing.id_bits(vocab_size)
        low, high = packing.split_ids(frame.token_ids.numpy(), bits)
        tensors["token_ids_low"] = torch.from_numpy(low)
        if high is not None:
            tensors["token_ids_high"] = torch.from_numpy(high)
        metadata["id_bits"] = str(bits)
    else:
        tensors["token_ids"] = frame.token_ids.to(torch.int32).contiguous()
    if logprobs_q8:
        codes, top, step = packing.quantize_logprobs(frame.logprobs.float().numpy())
        tensors.update(
            logprobs_q8=torch.from_numpy(codes),
            logprobs_top=torch.from_numpy(top),
            logprobs_step=torch.from_numpy(step),
        )
    else:
        tensors["logprobs"] = frame.logprobs.contiguous()
    tensors["row_offsets"] = frame.row_offsets.to(torch.int64).contiguous()
    tensors["first_rows"] = frame.first_rows.to(torch.int64).contiguous()
    for name in _EXTRAS:
        extra = getattr(frame, name)
        if extra is not None:
            dtype = torch.int32 if name == "target_ranks" else torch.float32
            tensors[name] = extra.to(dtype).contiguous()
    for name in _SPAN_TENSORS:
        spans = getattr(frame, name)
        if spans is not None:
            tensors[name] = spans.to(torch.int64).contiguous()
    compact = ids_encoding != "int32" or logprobs_q8
    metadata["format_version"] = "3" if compact else str(frame.format_version)
    return save(tensors, metadata=metadata)


def _metadata_int(metadata: dict[str, str], key: str) -> int:
    try:
        return int(metadata[key])
    except (KeyError, ValueError) as exc:
        raise FrameError(f"packed token ids need an integer {key} in the metadata: {exc!r}") from exc


def _unpacked_ids(tensors: dict[str, torch.Tensor], metadata: dict[str, str], rows: int) -> torch.Tensor:
    """int32 [N, k] from the packed columns and the metadata's ``id_bits`` (and ``top_k`` for a whole-id stream)."""
    bits = _metadata_int(metadata, "id_bits")
    low, high = tensors.get("token_ids_low"), tensors.get("token_ids_high")
    if low is None:
        k = _metadata_int(metadata, "top_k")
    elif low.dim() != 2 or low.shape[0] != rows:
        raise FrameError(f"token_ids_low has shape {tuple(low.shape)}, expected ({rows}, k)")
    try:
        if low is None:
            ids = packing.unpack_ids(tensors["token_ids_packed"].numpy(), bits, rows * k)
            return torch.from_numpy(ids).view(rows, k)
        return torch.from_numpy(packing.join_ids(low.numpy(), None if high is None else high.numpy(), bits))
    except ValueError as exc:
        raise FrameError(f"packed token ids: {exc}") from exc


def _dequantized(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    missing = [n for n in _Q8_TENSORS if n not in tensors]
    if missing:
        raise FrameError(f"8-bit log-probs need {list(_Q8_TENSORS)}; the frame lacks {missing}")
    codes, top, step = (tensors[n].numpy() for n in _Q8_TENSORS)
    if codes.ndim != 2 or top.shape != (codes.shape[0],) or step.shape != (codes.shape[0],):
        raise FrameError(f"logprobs_q8 {codes.shape}, logprobs_top {top.shape}, logprobs_step {step.shape} disagree")
    return torch.from_numpy(packing.dequantize_logprobs(codes, top, step))


def decode_frame(data: bytes | bytearray | memoryview, *, validate: bool = True) -> TopkFrame:
    """Parse a frame; tensors are read-only views into ``data`` (no copy; packed columns are unpacked).

    ``validate=False`` skips the consistency checks of offsets and spans, for bytes checked before (a cache
    record behind its checksum, validated when written; the caller validates what it assembles from them).
    """
    buf = memoryview(data)
    if len(buf) < 8:
        raise FrameError("frame shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", buf[:8])
    if 8 + header_len > len(buf):
        raise FrameError(f"header length {header_len} exceeds frame of {len(buf)} bytes")
    try:
        header = json.loads(bytes(buf[8 : 8 + header_len]))
    except ValueError as exc:
        raise FrameError(f"frame header is not JSON: {exc}") from exc
    metadata = header.pop("__metadata__", {}) or {}
    version = metadata.get("format_version")
    readable = [str(v) for v in FORMAT_VERSIONS]
    if version not in readable:
        raise FrameError(f"frame format_version {version!r}, this client reads {' and '.join(readable)}")
    body = buf[8 + header_len :]
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # Views over immutable bytes are read-only by contract; torch warns regardless.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for name, spec in header.items():
            dtype = _DTYPES.get(spec["dtype"])
            if dtype is None:
                raise FrameError(f"tensor {name!r} has unsupported dtype {spec['dtype']}")
            start, end = spec["data_offsets"]
            shape = spec["shape"]
            if end > len(body) or start > end:
                raise FrameError(f"tensor {name!r} data [{start}, {end}) is outside the frame")
            if start == end:
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                tensors[name] = torch.frombuffer(body[start:end], dtype=dtype).view(shape)
    compact = sorted(tensors.keys() & {*_PACKED_IDS, *_Q8_TENSORS})
    if compact and version != "3":
        raise FrameError(f"packed ids and 8-bit log-probs are format 3; this format {version} frame has {compact}")
    if "logprobs_q8" in tensors:
        tensors["logprobs"] = _dequantized(tensors)
    if tensors.keys() & {"token_ids_low", "token_ids_packed"} and "logprobs" in tensors:
        tensors["token_ids"] = _unpacked_ids(tensors, metadata, int(tensors["logprobs"].shape[0]))
    missing = {"token_ids", "logprobs", "row_offsets", "first_rows"} - tensors.keys()
    if missing:
        raise FrameError(f"frame lacks tensors {sorted(missing)}")
    span_tensors = sorted(tensors.keys() & set(_SPAN_TENSORS))
    if version == "1" and span_tensors:
        raise FrameError(f"a format 1 frame carries no row spans, this one has {span_tensors}")
    if version == "2" and len(span_tensors) != len(_SPAN_TENSORS):
        raise FrameError(f"a format 2 frame carries row_spans and span_offsets, this one has {span_tensors}")
    if version == "3" and len(span_tensors) not in (0, len(_SPAN_TENSORS)):
        raise FrameError(f"row_spans and span_offsets come together, this frame has {span_tensors}")
    frame = TopkFrame(
        token_ids=tensors["token_ids"],
        logprobs=tensors["logprobs"],
        row_offsets=tensors["row_offsets"],
        first_rows=tensors["first_rows"],
        target_logprobs=tensors.get("target_logprobs"),
        tail_logmass=tensors.get("tail_logmass"),
        target_ranks=tensors.get("target_ranks"),
        row_spans=tensors.get("row_spans"),
        span_offsets=tensors.get("span_offsets"),
        metadata=metadata,
    )
    if validate:
        frame.validate()
    return frame
