"""The request schema: row spans checked where the request is parsed, and both row forms resolved alike."""

import pytest
from pydantic import ValidationError

from shared.protocol import TopkRequest

SEQS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [1, 2]]


def test_first_rows_and_row_spans_resolve_to_the_same_rows() -> None:
    by_first = TopkRequest(sequences=SEQS, top_k=2, first_rows=[2, 1, 0])
    by_spans = TopkRequest(sequences=SEQS, top_k=2, row_spans=[[[2, 5]], [[1, 2]], [[0, 1]]])
    assert by_first.resolved_row_spans() == by_spans.resolved_row_spans() == [[(2, 5)], [(1, 2)], [(0, 1)]]
    assert by_first.resolved_first_rows() == by_spans.resolved_first_rows() == [2, 1, 0]
    everything = TopkRequest(sequences=SEQS, top_k=2)
    assert everything.resolved_row_spans() == [[(0, 5)], [(0, 2)], [(0, 1)]]
    assert everything.resolved_first_rows() == [0, 0, 0]
    turns = TopkRequest(sequences=SEQS, top_k=2, row_spans=[[[0, 1], [3, 5]], [[1, 2]], []])
    assert turns.resolved_row_spans() == [[(0, 1), (3, 5)], [(1, 2)], []]
    assert turns.resolved_first_rows() == [0, 1, 1]  # no spans: L-1, rows from there on are none


@pytest.mark.parametrize(
    "row_spans,message",
    [
        ([[[0, 1]], [], []], "first_rows and row_spans are alternatives"),  # sent with first_rows, below
        ([[[0, 1]], []], "2 entries for 3 sequences"),
        ([[[0, 6]], [], []], r"row_spans\[0\]: span 0 \[0, 6\) is empty or outside the rows \[0, 5\)"),
        ([[], [[1, 1]], []], r"row_spans\[1\]: span 0 \[1, 1\) is empty"),
        ([[[2, 4], [3, 5]], [], []], r"row_spans\[0\]: span 1 \[3, 5\) overlaps"),
        ([[[3, 5], [0, 2]], [], []], r"row_spans\[0\]: span 1 \[0, 2\) overlaps or precedes"),
        ([[[0, 1, 2]], [], []], r"row_spans\[0\]: span 0 is \[0, 1, 2\], not \[start, end\]"),
        ([[[-1, 2]], [], []], r"row_spans\[0\]: span 0 \[-1, 2\)"),
    ],
)
def test_bad_spans_name_the_sequence(row_spans: list, message: str) -> None:
    first_rows = [0, 0, 0] if "alternatives" in message else None
    with pytest.raises(ValidationError, match=message) as err:
        TopkRequest(sequences=SEQS, top_k=2, first_rows=first_rows, row_spans=row_spans)
    assert err.value.errors()[0]["loc"] == ("row_spans",)


def test_spans_must_be_integers() -> None:
    with pytest.raises(ValidationError) as err:
        TopkRequest(sequences=SEQS, top_k=2, row_spans=[[[0, 1.5]], [], []])
    assert err.value.errors()[0]["loc"] == ("row_spans", 0, 0, 1)
