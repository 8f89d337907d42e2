"""The binary frame: exact round trips, compactness, refusals, and the two versions (1: a block of rows per
sequence; 2: row spans), with format 1 frames still readable by the reader released before spans."""

import struct

import frame_v1
import pytest
import torch
from safetensors.torch import save

from shared.codec import FrameError, TopkFrame, decode_frame, encode_frame


def _frame(dtype: torch.dtype, extras: bool) -> TopkFrame:
    gen = torch.Generator().manual_seed(0)
    n, k = 7, 5
    return TopkFrame(
        token_ids=torch.randint(0, 1000, (n, k), generator=gen, dtype=torch.int32),
        logprobs=(-torch.rand(n, k, generator=gen) * 10).sort(dim=-1, descending=True).values.to(dtype),
        row_offsets=torch.tensor([0, 3, 3 + 4], dtype=torch.int64),
        first_rows=torch.tensor([0, 2], dtype=torch.int64),
        target_logprobs=-torch.rand(n, generator=gen) if extras else None,
        tail_logmass=torch.tensor([-1.0, float("-inf"), -2, -3, -4, -5, -6]) if extras else None,
        metadata={"model": "m"},
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("extras", [False, True])
def test_round_trip_is_exact(dtype: torch.dtype, extras: bool) -> None:
    frame = _frame(dtype, extras)
    decoded = decode_frame(encode_frame(frame))
    assert decoded.logprobs.dtype == dtype
    assert torch.equal(decoded.token_ids, frame.token_ids)
    assert torch.equal(decoded.logprobs, frame.logprobs)
    assert torch.equal(decoded.row_offsets, frame.row_offsets)
    assert torch.equal(decoded.first_rows, frame.first_rows)
    assert decoded.metadata["model"] == "m"
    assert decoded.metadata["format_version"] == "1"  # no spans: the lowest version that holds it
    assert not decoded.has_spans and decoded.spans() == [[(0, 3)], [(2, 6)]]
    if extras:
        assert torch.equal(decoded.target_logprobs, frame.target_logprobs)
        assert torch.equal(decoded.tail_logmass, frame.tail_logmass)  # -inf survives the wire
    else:
        assert decoded.target_logprobs is None and decoded.tail_logmass is None
    assert decoded.rows(1) == slice(3, 7)


def test_frame_is_compact() -> None:
    frame = _frame(torch.float16, False)
    data = encode_frame(frame)
    payload = frame.token_ids.numel() * (4 + 2) + (3 + 2) * 8
    assert len(data) - payload < 400  # header only; no padding, no per-entry keys


def test_decode_rejects_garbage() -> None:
    data = encode_frame(_frame(torch.float16, False))
    with pytest.raises(FrameError):
        decode_frame(data[:5])
    with pytest.raises(FrameError):
        decode_frame(data[:-10])
    with pytest.raises(FrameError):
        decode_frame(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")


def test_decode_rejects_other_versions() -> None:
    frame = _frame(torch.float16, False)
    frame.metadata = {"format_version": "999"}
    assert decode_frame(encode_frame(frame)).metadata["format_version"] == "1"  # the writer states the version
    tensors = {"token_ids": frame.token_ids, "logprobs": frame.logprobs, "row_offsets": frame.row_offsets}
    for version in ("999", "0", None):
        metadata = {} if version is None else {"format_version": version}
        data = save({**tensors, "first_rows": frame.first_rows}, metadata=metadata)
        with pytest.raises(FrameError, match="format_version"):
            decode_frame(data)


def test_encode_rejects_inconsistent_offsets() -> None:
    frame = _frame(torch.float16, False)
    frame.row_offsets = torch.tensor([0, 3, 6])
    with pytest.raises(FrameError, match="row_offsets"):
        encode_frame(frame)


def test_select_and_concat_are_inverse() -> None:
    frame = _frame(torch.float32, True)
    first, second = frame.select(0, 1), frame.select(1, 2, top_k=3)
    assert first.row_offsets.tolist() == [0, 3] and second.row_offsets.tolist() == [0, 4]
    assert second.token_ids.shape == (4, 3) and torch.equal(second.token_ids, frame.token_ids[3:, :3])
    assert second.first_rows.tolist() == [2]
    joined = TopkFrame.concat([frame.select(0, 1), frame.select(1, 2)])
    for name in ("token_ids", "logprobs", "row_offsets", "first_rows", "target_logprobs", "tail_logmass"):
        assert torch.equal(getattr(joined, name), getattr(frame, name)), name


def test_select_fewer_columns_moves_their_mass_into_the_tail() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=gen) * 3
    lp = torch.log_softmax(logits.double(), -1)
    vals, ids = lp.topk(8)
    frame = TopkFrame(
        ids.int(),
        vals.float(),
        torch.tensor([0, 5]),
        torch.tensor([0]),
        tail_logmass=torch.log1p(-vals.exp().sum(-1)).float(),
    )
    narrow = frame.select(0, 1, top_k=3)
    torch.testing.assert_close(narrow.tail_logmass.double(), torch.log1p(-vals[:, :3].exp().sum(-1)), atol=1e-6, rtol=0)
    assert torch.equal(frame.select(0, 1).tail_logmass, frame.tail_logmass)


# --- format 2: row spans

SPANS = [[(1, 3), (5, 8)], [], [(0, 2)], [(2, 3), (4, 5), (7, 9)]]
LENS = [10, 4, 3, 12]


def _span_frame(extras: bool = True) -> TopkFrame:
    gen = torch.Generator().manual_seed(2)
    n, k = 2 + 3 + 0 + 2 + 1 + 1 + 2, 4
    return TopkFrame.from_spans(
        torch.randint(0, 1000, (n, k), generator=gen, dtype=torch.int32),
        (-torch.rand(n, k, generator=gen) * 10).sort(dim=-1, descending=True).values,
        SPANS,
        LENS,
        target_logprobs=-torch.rand(n, generator=gen) if extras else None,
        tail_logmass=-torch.rand(n, generator=gen) if extras else None,
        metadata={"model": "m"},
    )


def test_span_frame_round_trip() -> None:
    frame = _span_frame()
    assert frame.row_offsets.tolist() == [0, 5, 5, 7, 11]
    assert frame.first_rows.tolist() == [1, 3, 0, 2]  # no spans: L-1, as first_rows says "no rows"
    assert frame.row_spans.tolist() == [[1, 3], [5, 8], [0, 2], [2, 3], [4, 5], [7, 9]]
    assert frame.span_offsets.tolist() == [0, 2, 2, 3, 6]
    data = encode_frame(frame)
    decoded = decode_frame(data)
    assert decoded.metadata["format_version"] == "2" and decoded.format_version == 2
    assert decoded.spans() == SPANS
    for name in ("token_ids", "logprobs", "row_offsets", "first_rows", "row_spans", "span_offsets", "tail_logmass"):
        assert torch.equal(getattr(decoded, name), getattr(frame, name)), name
    # the body is the tensors and nothing else: spans cost 16 bytes each, plus 8 a sequence for their offsets
    (header_len,) = struct.unpack("<Q", data[:8])
    payload = 11 * 4 * (4 + 4) + 11 * (4 + 4) + (5 + 4) * 8 + (6 * 2 + 5) * 8
    assert len(data) - 8 - header_len == payload


def test_old_reader_reads_frames_without_spans_and_refuses_span_frames() -> None:
    """An old client (the format 1 reader as released) decodes what a new writer sends without spans."""
    frame = _frame(torch.float16, True)
    old = frame_v1.decode_frame(encode_frame(frame))
    assert old.metadata["format_version"] == "1"
    for name in ("token_ids", "logprobs", "row_offsets", "first_rows", "target_logprobs", "tail_logmass"):
        assert torch.equal(getattr(old, name), getattr(frame, name)), name
    with pytest.raises(frame_v1.FrameError, match="format_version '2'"):
        frame_v1.decode_frame(encode_frame(_span_frame()))


def test_versions_and_span_tensors_agree() -> None:
    spans = _span_frame(extras=False)
    tensors = {
        "token_ids": spans.token_ids,
        "logprobs": spans.logprobs,
        "row_offsets": spans.row_offsets,
        "first_rows": spans.first_rows,
    }
    with pytest.raises(FrameError, match="format 1 frame carries no row spans"):
        decode_frame(save({**tensors, "row_spans": spans.row_spans}, metadata={"format_version": "1"}))
    with pytest.raises(FrameError, match="format 2 frame carries row_spans and span_offsets"):
        decode_frame(save({**tensors, "row_spans": spans.row_spans}, metadata={"format_version": "2"}))


@pytest.mark.parametrize(
    "row_spans,span_offsets,first_rows,match",
    [
        ([[1, 3], [2, 8], [0, 2], [2, 3], [4, 5], [7, 9]], None, None, "overlap"),
        ([[1, 3], [5, 8], [0, 2], [2, 3], [4, 5], [7, 7], [7, 9]], [0, 2, 2, 3, 7], None, "empty"),
        ([[1, 3], [5, 9], [0, 2], [2, 3], [4, 5], [7, 8]], None, None, "rows per sequence"),
        (None, [0, 2, 3, 3, 6], None, "rows per sequence"),
        (None, [0, 2, 2, 3], None, "span_offsets"),
        (None, None, [0, 3, 0, 2], "first_rows"),
    ],
)
def test_inconsistent_spans_are_refused(row_spans, span_offsets, first_rows, match: str) -> None:
    frame = _span_frame()
    if row_spans is not None:
        frame.row_spans = torch.tensor(row_spans)
    if span_offsets is not None:
        frame.span_offsets = torch.tensor(span_offsets)
    if first_rows is not None:
        frame.first_rows = torch.tensor(first_rows)
    with pytest.raises(FrameError, match=match):
        encode_frame(frame)


def test_select_and_concat_carry_spans() -> None:
    frame = _span_frame()
    parts = [frame.select(0, 1), frame.select(1, 3, top_k=2), frame.select(3, 4)]
    assert [p.spans() for p in parts] == [SPANS[:1], SPANS[1:3], SPANS[3:]]
    assert parts[1].row_offsets.tolist() == [0, 0, 2] and parts[1].span_offsets.tolist() == [0, 0, 1]
    assert torch.equal(parts[2].token_ids, frame.token_ids[7:])
    joined = TopkFrame.concat([frame.select(0, 1), frame.select(1, 3), frame.select(3, 4)])
    for name in ("token_ids", "logprobs", "row_offsets", "first_rows", "row_spans", "span_offsets", "tail_logmass"):
        assert torch.equal(getattr(joined, name), getattr(frame, name)), name
    # a part without spans joins as its one block of rows per sequence
    plain = _frame(torch.float32, True).select(0, 2, top_k=frame.top_k)
    mixed = TopkFrame.concat([frame.select(0, 1), plain])
    assert mixed.spans() == [SPANS[0], [(0, 3)], [(2, 6)]]
    mixed.validate()


def test_spans_cut_out_of_blocks_equal_the_same_rows_of_a_full_frame() -> None:
    """from_blocks (how engines scoring whole prompts answer spans) picks exactly the rows the spans name."""
    gen = torch.Generator().manual_seed(3)
    n_rows = [L - 1 for L in LENS]
    full = TopkFrame(
        torch.randint(0, 1000, (sum(n_rows), 4), generator=gen, dtype=torch.int32),
        -torch.rand(sum(n_rows), 4, generator=gen),
        torch.tensor([0, *torch.tensor(n_rows).cumsum(0).tolist()]),
        torch.zeros(len(LENS), dtype=torch.int64),
        target_logprobs=-torch.rand(sum(n_rows), generator=gen),
    )
    expected = torch.cat(
        [
            torch.arange(int(full.row_offsets[b]) + s, int(full.row_offsets[b]) + e)
            for b, sp in enumerate(SPANS)
            for s, e in sp
        ]
    )
    # blocks from each sequence's first span start through its last span, sequences without spans left out
    with_rows = [b for b, sp in enumerate(SPANS) if sp]
    blocks = TopkFrame.concat(
        [
            TopkFrame(
                full.token_ids[full.rows(b)][SPANS[b][0][0] : SPANS[b][-1][1]],
                full.logprobs[full.rows(b)][SPANS[b][0][0] : SPANS[b][-1][1]],
                torch.tensor([0, SPANS[b][-1][1] - SPANS[b][0][0]]),
                torch.tensor([SPANS[b][0][0]]),
                target_logprobs=full.target_logprobs[full.rows(b)][SPANS[b][0][0] : SPANS[b][-1][1]],
            )
            for b in with_rows
        ]
    )
    for block in (blocks, None):
        if block is None:  # the full frame is a block frame too, but it also holds the sequence without spans
            with pytest.raises(ValueError, match="4 blocks of rows for 3 sequences with spans"):
                TopkFrame.from_blocks(full, SPANS, LENS)
            continue
        cut = TopkFrame.from_blocks(block, SPANS, LENS)
        assert cut.spans() == SPANS and cut.first_rows.tolist() == [1, 3, 0, 2]
        assert torch.equal(cut.token_ids, full.token_ids[expected])
        assert torch.equal(cut.target_logprobs, full.target_logprobs[expected])
    with pytest.raises(ValueError, match="outside the computed rows"):
        TopkFrame.from_blocks(blocks, [[(1, 3), (5, 9)], [], [(0, 2)], [(2, 3), (4, 5), (7, 9)]], LENS)


def test_with_and_without_spans() -> None:
    plain = _frame(torch.float32, False)
    spanned = plain.with_spans()
    assert spanned.format_version == 2 and spanned.spans() == plain.spans() == [[(0, 3)], [(2, 6)]]
    back = spanned.without_spans()
    assert back.format_version == 1 and torch.equal(back.first_rows, plain.first_rows)
    with pytest.raises(FrameError, match="3 row spans: format 1 holds one block"):
        _span_frame().without_spans()
