"""Batching choices as pure functions over plain data: how an endpoint splits its batch into encoder calls, how the
engine packs rows into passes, and which captured CUDA-graph shape a small batch runs in.

The engine computes no padding: it packs the rows' real tokens end to end (`plan_packed_passes`). Padding exists
only in the tensors an endpoint sends the encoder (one [rows, longest] tensor per call), so the endpoint makes as
few calls as the encoder's limits allow and, among those, pads least (`plan_encoder_calls`, by the exact
`plan_micro_batches`). Small batches run in power-of-two CUDA-graph shapes (`graph_shape`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_micro_batches(
    lengths: Sequence[int],
    max_rows: int,
    max_padded_tokens: int,
    pass_overhead_tokens: int,
) -> list[list[int]]:
    """Group row indices, longest first, so each group has at most `max_rows` rows and `rows * longest` at most
    `max_padded_tokens` (a single row longer than the budget goes alone), minimising the padded tokens plus
    `pass_overhead_tokens` per group. Exact (dynamic programming over cuts of the length-sorted rows); every index
    appears exactly once."""
    if max_rows < 1 or max_padded_tokens < 1 or pass_overhead_tokens < 0:
        raise ValueError("max_rows and max_padded_tokens must be positive, pass_overhead_tokens not negative")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    count = len(order)
    # best[end]: least cost of the first `end` sorted rows; cut[end]: where the last group of that plan starts
    best = [0] + [0] * count
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        best[end] = -1
        for start in range(end - 1, max(-1, end - 1 - max_rows), -1):
            rows, longest = end - start, lengths[order[start]]
            if rows > 1 and rows * longest > max_padded_tokens:
                break  # longer groups only get wider
            cost = best[start] + rows * longest + pass_overhead_tokens
            if best[end] < 0 or cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = count
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def plan_encoder_calls(lengths: Sequence[int], max_rows: int, max_padded_tokens: int) -> list[list[int]]:
    """How an endpoint splits its batch into encoder calls (one padded tensor each): as few as the encoder's row
    limit and padded-token budget allow (a call costs a BLS round trip; the engine plans its own passes inside)."""
    return plan_micro_batches(lengths, max_rows, max_padded_tokens, pass_overhead_tokens=max_padded_tokens)


def plan_packed_passes(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices in passes of at most `max_tokens` real tokens each, in order (a row longer than that goes alone).
    Packed rows cost only their own tokens, so the fewest passes is the whole plan: no sorting, no padding."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    passes: list[list[int]] = []
    total = 0
    for index, length in enumerate(lengths):
        if passes and total + length <= max_tokens:
            passes[-1].append(index)
            total += length
        else:
            passes.append([index])
            total = length
    return passes


def padded_tokens(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> int:
    """Tokens a plan computes, padding included (the real ones are `sum(lengths)`)."""
    return sum(len(group) * max(lengths[i] for i in group) for group in groups)


def graph_shape(rows: int, width: int, max_tokens: int) -> tuple[int, int] | None:
    """The captured shape a batch runs in: rows and width rounded up to powers of two (width at least 16, the FP8
    GEMM's alignment), or None when that shape holds more than `max_tokens` tokens (then it runs uncaptured). Few
    shapes, so few graphs: at most log2(max_tokens) x log2(max_tokens / 16)."""
    shape = (1 << max(rows - 1, 0).bit_length(), max(16, 1 << max(width - 1, 0).bit_length()))
    return shape if shape[0] * shape[1] <= max_tokens else None


def graph_shapes(max_tokens: int, max_rows: int) -> list[tuple[int, int]]:
    """Every shape `graph_shape` can return for up to `max_rows` rows, smallest first."""
    return sorted(
        (rows, width)
        for rows in (1 << i for i in range(max_rows.bit_length()) if 1 << i <= max_rows)
        for width in (1 << i for i in range(4, max_tokens.bit_length()))
        if rows * width <= max_tokens
    )


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows into INT64 `(ids, mask)` arrays of shape [rows, longest]."""
    if not rows:
        raise ValueError("no rows to pad")
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
    return ids, mask
