"""The binary `/v1/topk_logprobs` frame: a safetensors byte string with ragged rows.

Rows of all sequences are concatenated (no padding bytes); ``row_offsets[b]`` to
``row_offsets[b+1]`` are sequence b's rows, and ``first_rows[b]`` says which row
index (in the position convention of :mod:`shared.alignment`) the first of them is.
Encoding uses the safetensors library; decoding parses the header once and returns
zero-copy views over the received bytes, which ``safetensors.torch.load`` (it copies
every tensor and drops the metadata) does not offer for in-memory buffers.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass, field

import torch
from safetensors.torch import save

from shared.protocol import FORMAT_VERSION

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}
LOGPROB_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


_EXTRAS = ("target_logprobs", "tail_logmass", "target_ranks")


class FrameError(ValueError):
    """The bytes are not a valid top-k frame."""


@dataclass
class TopkFrame:
    """Top-k teacher rows for a batch of sequences, in ragged layout.

    token_ids: int32 [N, k]; logprobs: float [N, k] sorted descending per row;
    row_offsets: int64 [B+1]; first_rows: int64 [B]; optional per-row extras
    target_logprobs and tail_logmass: float32 [N]; target_ranks int32 [N] (1-based vocabulary
    rank of the actual next token, used by the vLLM-compatible JSON answer).
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    row_offsets: torch.Tensor
    first_rows: torch.Tensor
    target_logprobs: torch.Tensor | None = None
    tail_logmass: torch.Tensor | None = None
    target_ranks: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return int(self.row_offsets.numel()) - 1

    @property
    def top_k(self) -> int:
        return int(self.token_ids.shape[1])

    def rows(self, b: int) -> slice:
        return slice(int(self.row_offsets[b]), int(self.row_offsets[b + 1]))

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
        return TopkFrame(
            token_ids=self.token_ids[r0:r1, :k],
            logprobs=self.logprobs[r0:r1, :k],
            row_offsets=self.row_offsets[lo : hi + 1] - r0,
            first_rows=self.first_rows[lo:hi],
            target_logprobs=rows(self.target_logprobs),
            tail_logmass=tail,
            target_ranks=rows(self.target_ranks),
            metadata=dict(self.metadata),
        )

    @staticmethod
    def concat(parts: list[TopkFrame]) -> TopkFrame:
        """Frames of consecutive sequence groups joined into one (offsets shifted, extras kept if all have them)."""
        if len(parts) == 1:
            return parts[0]
        offsets = [parts[0].row_offsets]
        base = int(parts[0].row_offsets[-1])
        for p in parts[1:]:
            offsets.append(p.row_offsets[1:] + base)
            base += int(p.row_offsets[-1])

        def cat(name: str) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if any(t is None for t in tensors) else torch.cat(tensors)

        return TopkFrame(
            token_ids=torch.cat([p.token_ids for p in parts]),
            logprobs=torch.cat([p.logprobs for p in parts]),
            row_offsets=torch.cat(offsets),
            first_rows=torch.cat([p.first_rows for p in parts]),
            target_logprobs=cat("target_logprobs"),
            tail_logmass=cat("tail_logmass"),
            target_ranks=cat("target_ranks"),
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
        for name in _EXTRAS:
            extra = getattr(self, name)
            if extra is not None and tuple(extra.shape) != (n,):
                raise FrameError(f"{name} has shape {tuple(extra.shape)}, expected ({n},)")


def encode_frame(frame: TopkFrame) -> bytes:
    frame.validate()
    tensors = {
        "token_ids": frame.token_ids.to(torch.int32).contiguous(),
        "logprobs": frame.logprobs.contiguous(),
        "row_offsets": frame.row_offsets.to(torch.int64).contiguous(),
        "first_rows": frame.first_rows.to(torch.int64).contiguous(),
    }
    for name in _EXTRAS:
        extra = getattr(frame, name)
        if extra is not None:
            dtype = torch.int32 if name == "target_ranks" else torch.float32
            tensors[name] = extra.to(dtype).contiguous()
    metadata = {"format_version": str(FORMAT_VERSION), **frame.metadata}
    return save(tensors, metadata=metadata)


def decode_frame(data: bytes | bytearray | memoryview) -> TopkFrame:
    """Parse a frame; tensors are read-only views into ``data`` (no copy)."""
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
    if version != str(FORMAT_VERSION):
        raise FrameError(f"frame format_version {version!r}, this client reads {FORMAT_VERSION}")
    body = buf[8 + header_len :]
    tensors: dict[str, torch.Tensor] = {}
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
            with warnings.catch_warnings():
                # Views over immutable bytes are read-only by contract; torch warns regardless.
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                tensors[name] = torch.frombuffer(body[start:end], dtype=dtype).view(shape)
    missing = {"token_ids", "logprobs", "row_offsets", "first_rows"} - tensors.keys()
    if missing:
        raise FrameError(f"frame lacks tensors {sorted(missing)}")
    frame = TopkFrame(
        token_ids=tensors["token_ids"],
        logprobs=tensors["logprobs"],
        row_offsets=tensors["row_offsets"],
        first_rows=tensors["first_rows"],
        target_logprobs=tensors.get("target_logprobs"),
        tail_logmass=tensors.get("tail_logmass"),
        target_ranks=tensors.get("target_ranks"),
        metadata=metadata,
    )
    frame.validate()
    return frame
