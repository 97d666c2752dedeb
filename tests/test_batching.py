"""The batching policy is a pure function: property tests, no server."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from triton_rag.core.batching import (
    graph_shape,
    graph_shapes,
    pad_rows,
    padded_tokens,
    plan_encoder_calls,
    plan_micro_batches,
    plan_packed_passes,
)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=5000), max_size=80),
    max_rows=st.integers(min_value=1, max_value=32),
    budget=st.integers(min_value=1, max_value=40000),
)
def test_micro_batches_cover_every_row_once_within_limits(lengths: list[int], max_rows: int, budget: int) -> None:
    groups = plan_micro_batches(lengths, max_rows, budget, 512)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert 1 <= len(group) <= max_rows
        longest = max(lengths[i] for i in group)
        assert len(group) == 1 or len(group) * longest <= budget


def test_rows_of_similar_length_go_together() -> None:
    lengths = [10, 4000, 12, 3900, 11]
    assert plan_micro_batches(lengths, 32, 8000, pass_overhead_tokens=512) == [[1, 3], [2, 4, 0]]


def _cost(lengths: list[int], groups: list[list[int]], overhead: int) -> int:
    return padded_tokens(lengths, groups) + overhead * len(groups)


def _all_plans(sorted_rows: list[int]) -> list[list[list[int]]]:
    """Every cut of the length-sorted rows into consecutive groups (brute force for small inputs)."""
    if not sorted_rows:
        return [[]]
    return [[sorted_rows[:k], *rest] for k in range(1, len(sorted_rows) + 1) for rest in _all_plans(sorted_rows[k:])]


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=8),
    max_rows=st.integers(min_value=1, max_value=8),
    budget=st.integers(min_value=1, max_value=3000),
    overhead=st.integers(min_value=0, max_value=400),
)
def test_micro_batches_cost_no_more_than_any_other_cut(
    lengths: list[int], max_rows: int, budget: int, overhead: int
) -> None:
    groups = plan_micro_batches(lengths, max_rows, budget, overhead)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    feasible = [
        plan
        for plan in _all_plans(order)
        if all(len(g) <= max_rows and (len(g) == 1 or len(g) * lengths[g[0]] <= budget) for g in plan)
    ]
    assert _cost(lengths, groups, overhead) == min(_cost(lengths, plan, overhead) for plan in feasible)


def test_random_lengths_are_cut_where_they_jump() -> None:
    """32 texts of 32-512 tokens: one padded batch computes ~1.8x the real tokens; with a pass worth 256 tokens the
    plan stays within 10%."""
    lengths = np.random.default_rng(0).integers(32, 513, size=32).tolist()
    one_batch = padded_tokens(lengths, [list(range(32))])
    groups = plan_micro_batches(lengths, max_rows=32, max_padded_tokens=32768, pass_overhead_tokens=256)
    assert one_batch > 1.5 * sum(lengths)
    assert padded_tokens(lengths, groups) < 1.1 * sum(lengths)
    assert 2 <= len(groups) <= 8


def test_without_pass_overhead_every_row_goes_alone_unless_lengths_are_equal() -> None:
    groups = plan_micro_batches([5, 7, 7, 9], max_rows=4, max_padded_tokens=100, pass_overhead_tokens=0)
    assert padded_tokens([5, 7, 7, 9], groups) == 28


def test_graph_shapes_round_up_to_powers_of_two_within_the_token_limit() -> None:
    assert graph_shape(1, 16, 2048) == (1, 16)
    assert graph_shape(1, 3, 2048) == (1, 16)
    assert graph_shape(3, 17, 2048) == (4, 32)
    assert graph_shape(16, 128, 2048) == (16, 128)
    assert graph_shape(17, 100, 2048) is None
    assert graph_shape(1, 2049, 4096) == (1, 4096)
    assert graph_shape(2, 2049, 4096) is None


def test_the_graph_shapes_captured_at_load_are_all_that_small_batches_can_need() -> None:
    shapes = graph_shapes(2048, 64)
    assert len(shapes) == len(set(shapes)) == 35
    needed = {graph_shape(r, w, 2048) for r in range(1, 65) for w in range(1, 2049)} - {None}
    assert needed == set(shapes)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        plan_micro_batches([1], 0, 10, 0)
    with pytest.raises(ValueError):
        plan_packed_passes([1], 0)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=5000), max_size=80),
    budget=st.integers(min_value=1, max_value=40000),
)
def test_packed_passes_keep_order_and_fill_up_to_the_budget(lengths: list[int], budget: int) -> None:
    passes = plan_packed_passes(lengths, budget)
    assert [i for rows in passes for i in rows] == list(range(len(lengths)))
    for rows, following in zip(passes, passes[1:], strict=False):  # a pass is cut only where the next row would not fit
        assert sum(lengths[i] for i in rows) + lengths[following[0]] > budget
    for rows in passes:  # only a row longer than the budget overflows, alone
        assert len(rows) == 1 or sum(lengths[i] for i in rows) <= budget


def test_a_row_longer_than_the_pass_budget_goes_alone() -> None:
    assert plan_packed_passes([10, 100, 10, 10], 30) == [[0], [1], [2, 3]]


def test_pad_rows_right_pads_ids_and_mask() -> None:
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    assert ids.dtype == np.int64 and mask.dtype == np.int64


def test_an_endpoint_makes_as_few_encoder_calls_as_the_limits_allow() -> None:
    lengths = np.random.default_rng(1).integers(32, 513, size=100).tolist()
    assert len(plan_encoder_calls(lengths[:20], max_rows=64, max_padded_tokens=32768)) == 1  # padding is cheap here
    calls = plan_encoder_calls(lengths, max_rows=64, max_padded_tokens=32768)
    assert len(calls) == 2 and all(len(c) * max(lengths[i] for i in c) <= 32768 for c in calls)
