"""The format 1 frame reader as released before row spans (shared/codec.py at b763b29, its decoding part
verbatim; select, concat and encode_frame left out): what an old client runs. The tests decode a new teacher's
answers with it to show that requests without row_spans still reach old clients.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass, field

import torch

FORMAT_VERSION = 1

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
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
