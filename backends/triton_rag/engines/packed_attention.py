"""Attention over packed rows: many texts laid end to end in one sequence, each attending causally to itself only.

Packing is how the engine spends no compute on padding: a batch of texts of 40 and 500 tokens is one 540-token
sequence, not two 500-token rows. The segments are given by their cumulative bounds ([0, 40, 540]) and an upper
bound on the longest.

On CUDA the kernel is FlashAttention's variable-length forward (`aten::_flash_attention_forward` with cumulative
lengths: grouped-query heads natively, bf16/fp16). On a CPU each segment runs through SDPA on its own, the reference
the tests hold the packing to.
"""

from __future__ import annotations

import torch


def attend_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, longest: int, scaling: float
) -> torch.Tensor:
    """q [tokens, heads, dim], k/v [tokens, kv_heads, dim], segments `bounds` (int32) -> [tokens, heads, dim]."""
    if q.is_cuda:
        return torch.ops.aten._flash_attention_forward(
            q, k, v, bounds, bounds, longest, longest, 0.0, True, False, scale=scaling
        )[0]
    return _segment_by_segment(q, k, v, bounds, scaling)


def _segment_by_segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, scaling: float
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    edges = bounds.tolist()
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        if end == start:
            continue
        segment = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [heads, length, dim]
        keys, values = (t.repeat_interleave(groups, dim=0) for t in segment[1:])
        attended = torch.nn.functional.scaled_dot_product_attention(
            segment[0], keys, values, is_causal=True, scale=scaling
        )
        out[start:end] = attended.transpose(0, 1)
    return out
