"""Batching choices as pure functions over plain data: which rows go to the encoder together, and how they are padded.

Rows are sorted by length and cut into micro-batches whose padded area stays under a token budget, so a batch that
mixes a 20-token query with a 4000-token document does not pad the query to 4000 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_micro_batches(lengths: Sequence[int], max_rows: int, max_padded_tokens: int) -> list[list[int]]:
    """Group row indices, longest first, so each group has at most `max_rows` rows and `rows * longest` at most
    `max_padded_tokens` (a single row longer than the budget goes alone). Every index appears exactly once."""
    if max_rows < 1 or max_padded_tokens < 1:
        raise ValueError("max_rows and max_padded_tokens must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * longest > max_padded_tokens):
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


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
