"""Attention over packed rows: many texts laid end to end in one sequence, each attending causally to itself only.

Packing is how the engine spends no compute on padding: a batch of texts of 40 and 500 tokens is one 540-token
sequence, not two 500-token rows. transformers' Qwen3 layers call attention through its `AttentionInterface`, passing
through keyword arguments from the layer call, so the engine registers `packed_attention` under `PACKED_ATTENTION`
and hands each layer the segment boundaries (`cu_seq_lens_q`, transformers' own name for them) and the longest
segment (`max_length_q`). Without those arguments it is plain SDPA, with SDPA's masks (the padded CUDA-graph path,
transformers' masked forward, the ONNX export).

On CUDA the kernel is FlashAttention's variable-length forward (`aten::_flash_attention_forward` with cumulative
lengths: grouped-query heads natively, bf16/fp16). On a CPU each segment runs through SDPA on its own, the reference
the tests hold the packing to.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: The name the engine loads causal decoders with (`attn_implementation=`).
PACKED_ATTENTION = "triton_rag_packed"


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] -> [1, tokens, heads, dim]."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("packed attention takes one packed sequence and no mask")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    if q.is_cuda:
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, 0.0, True, False, scale=scaling
        )[0]
    else:
        out = _segment_by_segment(q, k, v, cu_seq_lens_q, scaling)
    return out[None], None


def _segment_by_segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, scaling: float | None
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


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
# a masked forward (transformers' own, the ONNX export) builds the mask SDPA takes, as with "sdpa"
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
