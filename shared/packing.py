"""Compact encodings of a frame's columns: token ids in ceil(log2 V) bits (at least 16), log-probs 8-bit.

Packed ids travel as two columns: the low 16 bits of every id as a uint16 array (read in place, widened
with one ``astype``), and the bits above 16 (``h = ceil(log2 V) - 16``: 2 for V = 152k, 1 for 128k, 0 up to
65536) bit-packed. Decoding the high bits is one table lookup per byte (a cached table of the high parts of
the ids it holds, already shifted by 16) and one OR with the low bits, so the decode costs a few passes over
the ids, not the per-id shifts of a full bit stream. Vocabularies under 2**16 pay 16 - ceil(log2 V) bits per id
for it (one for a 32k vocabulary).

Bit packing (of the high bits; and of whole ids in the first format 3 frames, still read): ids are written
little-endian, id i at bits ``[i*b, (i+1)*b)`` of the stream (b = id bits).
Eight ids fill exactly b bytes, so id j of every group of eight sits at the same byte offset and shift
within its group: encoding and decoding are eight strided numpy operations over the groups (an unaligned
32-bit window read per id when decoding, 64-bit above 25 bits), never a Python loop over rows or ids.

8-bit log-probs (``q8``): per row, the top log-prob ``top`` (float32, exact) and a step
``(top - lowest finite) / 254`` (float32); entry = ``top - code * step`` with code 0..254, and code 255
for -inf. The error of every finite entry is at most half a step, ``(top - lowest) / 508`` (plus float32
rounding): about 0.04 nats for a row spanning 20 nats, so each kept probability within about 4% of its
value; the top entry is exact.
"""

from __future__ import annotations

from functools import cache

import numpy as np

MAX_ID_BITS = 32
"""Token ids are int32 in every frame; a 64-bit read window holds any id of up to 57 bits at any shift."""

Q8_LEVELS = 254
"""Codes 0..254 hold finite log-probs (255 steps of the row's range would leave no code for -inf)."""
Q8_NEG_INF = 255


def id_bits(vocab_size: int) -> int:
    """ceil(log2 V): the bits that hold every id of a vocabulary of ``vocab_size`` tokens (at least 1)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return max(1, (vocab_size - 1).bit_length())


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` ids at ``bits`` bits each."""
    return (count * bits + 7) // 8


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """Ids (any integer dtype, any shape; each in [0, 2**bits)) as a uint8 bit stream of packed_size bytes."""
    if not 1 <= bits <= MAX_ID_BITS:
        raise ValueError(f"id bits must be in [1, {MAX_ID_BITS}], got {bits}")
    flat = np.ascontiguousarray(ids).reshape(-1)
    count = flat.size
    if count and (int(flat.min()) < 0 or int(flat.max()) >> bits):
        raise ValueError(f"token ids outside [0, 2**{bits}) cannot be packed at {bits} bits")
    groups = -(-count // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:count] = flat
    grid = padded.reshape(groups, 8)
    out = np.zeros(groups * bits + 8, dtype=np.uint8)  # 8 bytes of slack for the last group's window
    for j in range(8):
        base, shift = (j * bits) >> 3, (j * bits) & 7
        value = grid[:, j] << np.uint64(shift)
        for t in range((shift + bits + 7) // 8):
            out[base + t : base + t + groups * bits : bits] |= ((value >> np.uint64(8 * t)) & np.uint64(0xFF)).astype(
                np.uint8
            )
    return out[: packed_size(count, bits)]


def unpack_ids(stream: np.ndarray | memoryview | bytes, bits: int, count: int) -> np.ndarray:
    """``count`` int32 ids from a stream written by :func:`pack_ids` (copied once into a padded buffer)."""
    if not 1 <= bits <= MAX_ID_BITS:
        raise ValueError(f"id bits must be in [1, {MAX_ID_BITS}], got {bits}")
    raw = np.frombuffer(stream, dtype=np.uint8)
    if raw.size != packed_size(count, bits):
        raise ValueError(f"{raw.size} bytes hold no {count} ids of {bits} bits ({packed_size(count, bits)} bytes)")
    if count == 0:
        return np.empty(0, dtype=np.int32)
    groups = -(-count // 8)
    buf = np.zeros(groups * bits + 8, dtype=np.uint8)
    buf[: raw.size] = raw
    # a 32-bit window holds an id at any shift up to 25 bits (33M tokens); wider ids read 64-bit windows
    window, dtype = ("<u4", np.uint32) if bits + 7 <= 32 else ("<u8", np.uint64)
    columns = np.empty((8, groups), dtype=dtype)  # id j of every group, written contiguously
    for j in range(8):
        base, shift = (j * bits) >> 3, (j * bits) & 7
        view = np.ndarray((groups,), dtype=window, buffer=buf, offset=base, strides=(bits,))
        np.right_shift(view, dtype(shift), out=columns[j])
    np.bitwise_and(columns, dtype((1 << bits) - 1), out=columns)
    return columns.T.astype(np.int32, order="C").reshape(-1)[:count]


LOW_BITS = 16
"""Bits of every id carried as a plain uint16 column."""


def split_ids(ids: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(low 16 bits as uint16, same shape; the bits above packed at ``bits - 16`` bits, None when bits <= 16)."""
    if not 1 <= bits <= MAX_ID_BITS:
        raise ValueError(f"id bits must be in [1, {MAX_ID_BITS}], got {bits}")
    flat = np.ascontiguousarray(ids)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >> bits):
        raise ValueError(f"token ids outside [0, 2**{bits}) cannot be packed at {bits} bits")
    low = (flat & 0xFFFF).astype(np.uint16)
    if bits <= LOW_BITS:
        return low, None
    return low, pack_ids(flat.reshape(-1) >> LOW_BITS, bits - LOW_BITS)


@cache
def _high_table(high_bits: int) -> np.ndarray:
    """int32 [256, 8 // high_bits]: the high parts (shifted by 16) of the ids whose bits a byte holds."""
    index = np.arange(256, dtype=np.int64)[:, None]
    shifts = np.arange(8 // high_bits, dtype=np.int64) * high_bits
    table = ((index >> shifts) & ((1 << high_bits) - 1)) << LOW_BITS
    table = table.astype(np.int32)
    table.flags.writeable = False
    return table


def join_ids(low: np.ndarray, high: np.ndarray | memoryview | bytes | None, bits: int) -> np.ndarray:
    """int32 ids (``low``'s shape) from :func:`split_ids`' columns."""
    if not 1 <= bits <= MAX_ID_BITS:
        raise ValueError(f"id bits must be in [1, {MAX_ID_BITS}], got {bits}")
    if low.dtype != np.uint16:
        raise ValueError(f"the low 16 bits of ids are uint16, got {low.dtype}")
    h = bits - LOW_BITS
    if h <= 0:
        if high is not None:
            raise ValueError(f"ids of {bits} bits have no high bits, yet the frame carries them")
        return low.astype(np.int32)
    if high is None:
        raise ValueError(f"ids of {bits} bits need their high {h} bits")
    count = low.size
    stream = np.frombuffer(high, dtype=np.uint8)
    if stream.size != packed_size(count, h):
        raise ValueError(f"{stream.size} bytes hold no high bits of {count} ids at {h} bits")
    if 8 % h:  # 3, 5, 6, 7 or over 8 bits: the general bit stream
        out = unpack_ids(stream, h, count)
        np.left_shift(out, LOW_BITS, out=out)
    else:  # 1, 2, 4 or 8 bits: each byte indexes a table (at most 8 KiB) of the 8 // h high parts it holds
        out = np.take(_high_table(h), stream, axis=0, mode="clip").reshape(-1)[:count]
    np.bitwise_or(out, low.reshape(-1), out=out)
    return out.reshape(low.shape)


def quantize_logprobs(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [N, k], top float32 [N], step float32 [N]) of rows sorted descending (see module doc)."""
    lp = np.asarray(logprobs, dtype=np.float32)
    if lp.ndim != 2:
        raise ValueError(f"log-probs must be [N, k], got shape {lp.shape}")
    finite = np.isfinite(lp)
    if bool((np.isposinf(lp) | np.isnan(lp)).any()):
        raise ValueError("log-probs hold NaN or +inf")
    top = np.where(finite, lp, -np.inf).max(axis=1, initial=-np.inf).astype(np.float32)
    low = np.where(finite, lp, np.inf).min(axis=1, initial=np.inf).astype(np.float32)
    has = np.isfinite(top)
    step = np.where(has, (top - np.where(has, low, top)) / Q8_LEVELS, 0).astype(np.float32)
    safe_top = np.where(has, top, 0).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(step[:, None] > 0, (safe_top[:, None] - lp) / step[:, None], 0.0)
    codes = np.clip(np.rint(np.where(finite, scaled, 0)), 0, Q8_LEVELS).astype(np.uint8)
    codes[~finite] = Q8_NEG_INF
    return codes, top, step


def dequantize_logprobs(codes: np.ndarray, top: np.ndarray, step: np.ndarray) -> np.ndarray:
    """float32 [N, k] log-probs of :func:`quantize_logprobs`'s output."""
    lp = top[:, None].astype(np.float32) - codes.astype(np.float32) * step[:, None].astype(np.float32)
    lp[codes == Q8_NEG_INF] = -np.inf
    return lp


def q8_error_bound(logprobs: np.ndarray) -> np.ndarray:
    """The documented bound per row: half a step, ``(top - lowest finite) / 508``."""
    lp = np.asarray(logprobs, dtype=np.float32)
    finite = np.isfinite(lp)
    top = np.where(finite, lp, -np.inf).max(axis=1, initial=-np.inf)
    low = np.where(finite, lp, np.inf).min(axis=1, initial=np.inf)
    return np.where(np.isfinite(top), (top - np.where(np.isfinite(low), low, top)) / (2 * Q8_LEVELS), 0.0)
