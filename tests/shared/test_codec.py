import pytest
import torch

from shared.codec import FrameError, TopkFrame, decode_frame, encode_frame
from shared.protocol import FORMAT_VERSION


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
    assert decoded.metadata["format_version"] == str(FORMAT_VERSION)
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
    with pytest.raises(FrameError, match="format_version"):
        decode_frame(encode_frame(frame))


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
