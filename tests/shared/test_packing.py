"""Packed frames (format 3): packed ids round-trip exactly at every width, 8-bit log-probs stay within their
documented bound, and a packed frame (and the first format 3 layout) decodes to the same rows as the int32 frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save

from shared.codec import FrameError, TopkFrame, decode_frame, encode_frame
from shared.packing import (
    dequantize_logprobs,
    id_bits,
    join_ids,
    pack_ids,
    packed_size,
    q8_error_bound,
    quantize_logprobs,
    split_ids,
    unpack_ids,
)


@pytest.mark.parametrize("vocab", [2, 3, 255, 256, 257, 32_000, 151_936, 2**31 - 1])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_ids_round_trip_at_every_width(vocab: int, count: int) -> None:
    ids = np.random.default_rng(vocab + count).integers(0, vocab, size=count)
    ids[: min(count, 2)] = [vocab - 1, 0][: min(count, 2)]  # the extremes
    bits = id_bits(vocab)
    assert 2 ** (bits - 1) < vocab <= 2**bits or vocab == 2
    stream = pack_ids(ids, bits)
    assert stream.size == packed_size(count, bits) == (count * bits + 7) // 8
    assert np.array_equal(unpack_ids(stream, bits, count), ids)


@pytest.mark.parametrize(
    "vocab", [2, 257, 32_000, 65_536, 65_537, 128_256, 151_936, 2**19, 2**20, 2**21, 2**24, 2**24 + 1, 2**31 - 1]
)
@pytest.mark.parametrize("count", [0, 1, 3, 8, 9, 1001])
def test_split_ids_round_trip_at_every_width(vocab: int, count: int) -> None:
    """Every high-bit width: none, the table paths (1, 2, 4, 8 bits) and the general stream, at counts that end
    mid-byte and mid-index."""
    ids = np.random.default_rng(vocab + count).integers(0, vocab, size=(count, 1)).astype(np.int32)
    ids[: min(count, 2), 0] = [vocab - 1, 0][: min(count, 2)]
    bits = id_bits(vocab)
    low, high = split_ids(ids, bits)
    assert low.dtype == np.uint16 and low.shape == ids.shape
    assert (high is None) == (bits <= 16)
    assert high is None or high.size == packed_size(count, bits - 16)
    back = join_ids(low, None if high is None else high.tobytes(), bits)
    assert back.dtype == np.int32 and np.array_equal(back, ids)


def test_split_ids_refuse_what_does_not_fit() -> None:
    low, high = split_ids(np.array([5, 70_000]), 17)
    with pytest.raises(ValueError, match="need their high 1 bits"):
        join_ids(low, None, 17)
    with pytest.raises(ValueError, match="hold no high bits"):
        join_ids(low, np.zeros(2, np.uint8), 17)
    with pytest.raises(ValueError, match="have no high bits"):
        join_ids(low, high, 16)
    with pytest.raises(ValueError, match="outside"):
        split_ids(np.array([70_000]), 16)


def test_ids_outside_the_width_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        pack_ids(np.array([0, 256]), 8)
    with pytest.raises(ValueError, match="bytes hold no"):
        unpack_ids(np.zeros(3, np.uint8), 8, 4)


def _rows(n: int = 64, k: int = 20, spread: float = 25.0) -> np.ndarray:
    gen = np.random.default_rng(1)
    lp = -np.sort(gen.random((n, k)) * spread, axis=1).astype(np.float32)
    lp[3, 7:] = -np.inf  # a row whose tail has no mass at all
    lp[4] = lp[4, 0]  # a flat row: step 0
    return lp


def test_q8_error_is_within_the_documented_bound() -> None:
    lp = _rows()
    codes, top, step = quantize_logprobs(lp)
    back = dequantize_logprobs(codes, top, step)
    finite = np.isfinite(lp)
    assert np.array_equal(np.isfinite(back), finite)  # -inf survives
    bound = q8_error_bound(lp)
    err = np.abs(np.where(finite, back, 0) - np.where(finite, lp, 0)).max(axis=1)
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()
    assert (bound <= 25.0 / 508 + 1e-6).all()  # (top - lowest) / 508
    assert np.array_equal(back[:, 0], lp[:, 0])  # the top entry is exact
    assert err.max() > bound.max() / 10  # the bound is not vacuous: quantization does cost something


def _frame(n: int = 50, k: int = 20, vocab: int = 151_936) -> TopkFrame:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (n, k), generator=gen, dtype=torch.int32)
    ids[0, 0] = vocab - 1
    spans = [[(0, 10), (20, 35)], [], [(4, 29)]]
    return TopkFrame.from_spans(
        ids,
        torch.from_numpy(_rows(n, k)).to(torch.float16),
        spans,
        [40, 3, 30],
        tail_logmass=-torch.rand(n, generator=gen),
        metadata={"model": "m", "vocab_size": str(vocab)},
    )


def test_packed_frame_decodes_to_the_int32_frames_rows() -> None:
    frame = _frame()
    plain, packed = encode_frame(frame), encode_frame(frame, ids_encoding="packed", vocab_size=151_936)
    a, b = decode_frame(plain), decode_frame(packed)
    assert b.metadata["format_version"] == "3" and b.metadata["id_bits"] == "18"
    assert torch.equal(a.token_ids, b.token_ids) and b.token_ids.dtype == torch.int32
    assert torch.equal(a.logprobs, b.logprobs) and b.logprobs.dtype == torch.float16  # lossless
    assert torch.equal(a.tail_logmass, b.tail_logmass) and b.spans() == frame.spans()
    saved = frame.token_ids.numel() * (32 - 18) / 8
    assert len(plain) - len(packed) >= saved - 128  # less a header entry, id_bits and alignment


def test_the_first_format_3_layout_still_decodes() -> None:
    """Frames (and teacher cache records) written with the whole ids in one bit stream, ``token_ids_packed``."""
    frame = _frame()
    old = {
        "token_ids_packed": torch.from_numpy(pack_ids(frame.token_ids.numpy(), 18)),
        "logprobs": frame.logprobs,
        "row_offsets": frame.row_offsets,
        "first_rows": frame.first_rows,
        "tail_logmass": frame.tail_logmass,
        "row_spans": frame.row_spans,
        "span_offsets": frame.span_offsets,
    }
    metadata = {"model": "m", "id_bits": "18", "top_k": "20", "format_version": "3"}
    decoded = decode_frame(save(old, metadata=metadata))
    assert torch.equal(decoded.token_ids, frame.token_ids) and decoded.spans() == frame.spans()
    with pytest.raises(FrameError, match="top_k"):
        decode_frame(save(old, metadata={**metadata, "top_k": "x"}))


def test_q8_frame_keeps_ids_and_bounds_logprobs() -> None:
    frame = _frame()
    decoded = decode_frame(encode_frame(frame, ids_encoding="packed", vocab_size=151_936, logprobs_q8=True))
    assert torch.equal(decoded.token_ids, frame.token_ids)
    exact = frame.logprobs.float().numpy()
    finite = np.isfinite(exact)
    err = np.abs(np.where(finite, decoded.logprobs.numpy(), 0) - np.where(finite, exact, 0)).max(axis=1)
    assert (err <= q8_error_bound(exact) * (1 + 1e-5) + 1e-6).all()
    q8_only = decode_frame(encode_frame(frame, logprobs_q8=True))  # int32 ids with 8-bit log-probs
    assert torch.equal(q8_only.token_ids, frame.token_ids) and q8_only.metadata["format_version"] == "3"


def test_compact_tensors_outside_format_3_are_refused() -> None:
    frame = _frame()
    packed = encode_frame(frame, ids_encoding="packed", vocab_size=151_936)
    relabelled = packed.replace(b'"format_version":"3"', b'"format_version":"2"')
    assert relabelled != packed
    with pytest.raises(FrameError, match="format 3"):
        decode_frame(relabelled)
    no_bits = packed.replace(b'"id_bits":"18"', b'"id_bits":"xx"')
    with pytest.raises(FrameError, match="id_bits"):
        decode_frame(no_bits)
    fewer_bits = packed.replace(b'"id_bits":"18"', b'"id_bits":"17"')
    with pytest.raises(FrameError, match="hold no high bits"):
        decode_frame(fewer_bits)
    low, high = split_ids(frame.token_ids.numpy()[:-1], 18)  # a row short of the log-probs
    short = {"token_ids_low": torch.from_numpy(low), "token_ids_high": torch.from_numpy(high)}
    rest = {"logprobs": frame.logprobs, "row_offsets": frame.row_offsets, "first_rows": frame.first_rows}
    with pytest.raises(FrameError, match="token_ids_low has shape"):
        decode_frame(save({**short, **rest}, metadata={"id_bits": "18", "format_version": "3"}))
    with pytest.raises(ValueError, match="vocabulary size"):
        encode_frame(frame, ids_encoding="packed")
