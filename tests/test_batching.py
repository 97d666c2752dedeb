"""The batching policy is a pure function: property tests, no server."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from triton_rag.batching import pad_rows, plan_micro_batches


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=5000), max_size=80),
    max_rows=st.integers(min_value=1, max_value=32),
    budget=st.integers(min_value=1, max_value=40000),
)
def test_micro_batches_cover_every_row_once_within_limits(lengths: list[int], max_rows: int, budget: int) -> None:
    groups = plan_micro_batches(lengths, max_rows, budget)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert 1 <= len(group) <= max_rows
        longest = max(lengths[i] for i in group)
        assert len(group) == 1 or len(group) * longest <= budget


def test_rows_of_similar_length_go_together() -> None:
    lengths = [10, 4000, 12, 3900, 11]
    assert plan_micro_batches(lengths, max_rows=32, max_padded_tokens=8000) == [[1, 3], [2, 4, 0]]


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        plan_micro_batches([1], 0, 10)


def test_pad_rows_right_pads_ids_and_mask() -> None:
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    assert ids.dtype == np.int64 and mask.dtype == np.int64
