"""The position convention, checked against the teacher model's own full logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from demo.tiny import TinyAssets
from shared.alignment import (
    as_row_spans,
    first_rows_of_spans,
    next_token_labels,
    padded_positions,
    row_offsets,
    span_row_offsets,
    spans_from_first_rows,
    tokens_for_spans,
    vllm_entry_for_row,
)
from teacher_service.engines.base import ScoreJob
from teacher_service.engines.hf import HFEngine

SEQS = [
    [5, 9, 14, 3, 8],
    [7, 2, 11, 40, 41, 42, 43, 19, 20],
    [30, 31],
    [4, 8, 15, 16, 23, 42, 99, 100, 101, 7, 3, 2, 1],
]
FIRSTS = [0, 3, 0, 10]


@pytest.fixture(scope="module")
def teacher(tiny_assets: TinyAssets) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_assets.teacher, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def frame(tiny_assets: TinyAssets):
    engine = HFEngine(tiny_assets.teacher, dtype="float32")
    engine.load()
    return engine.score_sync(
        ScoreJob.from_first_rows(SEQS, FIRSTS, top_k=8, want_target_logprobs=True, want_tail_logmass=True)
    )


def test_positions_by_hand() -> None:
    # right padding: lengths 3 and 5; left padding shifts the second sequence by 2
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    b, t = padded_positions(right, [0, 2])
    assert b.tolist() == [0, 0, 1, 1]
    assert t.tolist() == [0, 1, 2, 3]
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    b, t = padded_positions(left, [1, 0])
    assert b.tolist() == [0, 1, 1, 1, 1]
    assert t.tolist() == [3, 0, 1, 2, 3]
    assert row_offsets([3, 5], [0, 2]).tolist() == [0, 2, 4]
    assert vllm_entry_for_row(0) == 1


def test_engine_rows_are_next_token_distributions(frame, teacher) -> None:
    """Row j of the frame = log_softmax of the model's own logits at position j, sequence alone."""
    with torch.no_grad():
        for b, seq in enumerate(SEQS):
            lp = torch.log_softmax(teacher(input_ids=torch.tensor([seq])).logits[0].double(), dim=-1)
            rows = frame.rows(b)
            assert rows.stop - rows.start == len(seq) - 1 - FIRSTS[b]
            for r, j in zip(range(rows.start, rows.stop), range(FIRSTS[b], len(seq) - 1), strict=True):
                vals, ids = torch.topk(lp[j], 8)
                assert frame.token_ids[r].tolist() == ids.tolist()
                torch.testing.assert_close(frame.logprobs[r].double(), vals, atol=1e-4, rtol=0)
                torch.testing.assert_close(frame.target_logprobs[r].double(), lp[j, seq[j + 1]], atol=1e-4, rtol=0)
                tail = torch.log1p(-vals.exp().sum())
                torch.testing.assert_close(frame.tail_logmass[r].double(), tail, atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_student_rows_line_up_with_teacher_rows(frame, teacher, padding: str) -> None:
    """A padded student batch gathered with padded_positions sees exactly the frame's rows."""
    width = max(len(s) for s in SEQS)
    ids = torch.zeros(len(SEQS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(SEQS):
        sl = slice(0, len(s)) if padding == "right" else slice(width - len(s), width)
        ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    b_idx, t_idx = padded_positions(mask, FIRSTS)
    assert b_idx.numel() == frame.token_ids.shape[0]
    lp = torch.log_softmax(logits[b_idx, t_idx].double(), dim=-1)
    vals, top = torch.topk(lp, 8)
    assert torch.equal(top.int(), frame.token_ids)
    torch.testing.assert_close(vals.float(), frame.logprobs, atol=1e-4, rtol=0)
    labels = next_token_labels(ids, b_idx, t_idx)
    expected = [s[j + 1] for s, f in zip(SEQS, FIRSTS, strict=True) for j in range(f, len(s) - 1)]
    assert labels.tolist() == expected


def test_span_helpers() -> None:
    lens = [10, 4, 3]
    spans = [[(1, 3), (5, 8)], [], [(0, 2)]]
    assert first_rows_of_spans(lens, spans) == [1, 3, 0]
    assert spans_from_first_rows(lens, first_rows_of_spans(lens, spans_from_first_rows(lens, [2, 3, 0]))) == [
        [(2, 9)],
        [],
        [(0, 2)],
    ]
    assert [tokens_for_spans(s) for s in spans] == [9, 0, 3]
    assert span_row_offsets(spans).tolist() == [0, 5, 5, 7]
    assert as_row_spans([[[1, 3]], [], [(torch.tensor(0), 2)]]) == [[(1, 3)], [], [(0, 2)]]
