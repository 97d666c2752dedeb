"""The NVFP4 storage path's decode as one Triton kernel, registered as the torch op `triton_rag::nvfp4_decode_fp8`
so that `torch.compile` and AOTInductor compile it into the decoder layer like any other op.

Why a kernel of our own: on a GPU without FP4 tensor cores (Hopper, Ada) every GEMM of an NVFP4 layer first decodes
its weight to FP8, so the decode's speed is what the storage path costs over FP8. Inductor's fusion of
`Nvfp4Linear.fp8_weight` reached 270-415 GB/s on the H200 (tools/bench_nvfp4.py, BENCHMARKS.md): per-element work
on bytes. Here each thread reads one 32-bit word (8 codes, one E4M3 block scale per two words) and writes one
64-bit word (8 FP8 bytes), so loads and stores are wide and coalesced.

The values are `Nvfp4Linear.fp8_weight`'s: the same integer decode, the same float32 products, one rounding to E4M3.
Imported only where an NVFP4 storage layer is built on CUDA: it needs the `triton` compiler.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

#: 32-bit words (8 weights each) one program decodes.
WORDS_PER_PROGRAM = 1024
#: Codes in a packed 32-bit word; two words share one E4M3 block scale (16 weights).
CODES_PER_WORD = 8


@triton.jit
def _e2m1(code):  # int code (0-15) -> float32 value, by the same integer arithmetic as nvfp4.decode_e2m1
    exponent = (code >> 1) & 3
    mantissa = code & 1
    quarters = tl.where(exponent == 0, mantissa << 1, (mantissa + 2) << exponent)
    magnitude = quarters.to(tl.float32) * 0.25
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def _decode_kernel(
    words_ptr, block_scale_ptr, row_factor_ptr, out_ptr, total_words, words_per_row, BLOCK: tl.constexpr
):  # noqa: E501
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < total_words
    word = tl.load(words_ptr + index, mask=mask, other=0)
    block_scale = tl.load(block_scale_ptr + index // 2, mask=mask, other=0.0).to(tl.float32)
    factor = block_scale * tl.load(row_factor_ptr + index // words_per_row, mask=mask, other=0.0)
    out = tl.zeros([BLOCK], dtype=tl.int64)
    for n in tl.static_range(8):  # little-endian: code n is bits 4n..4n+3 of the word, its FP8 byte bits 8n..8n+7
        value = tl.clamp(_e2m1((word >> (4 * n)) & 15) * factor, -448.0, 448.0).to(tl.float8e4nv)
        out = out | (value.to(tl.uint8, bitcast=True).to(tl.int64) << (8 * n))
    tl.store(out_ptr + index, out, mask=mask)


@triton_op("triton_rag::nvfp4_decode_fp8", mutates_args={})
def decode_to_fp8(packed: torch.Tensor, block_scale: torch.Tensor, row_factor: torch.Tensor) -> torch.Tensor:
    """`Nvfp4Linear.fp8_weight` for CUDA tensors: packed uint8 [out, in/2], block scales float8_e4m3fn [out, in/16],
    row factors float32 [out, 1] -> float8_e4m3fn [out, in] (in a multiple of 16, all contiguous)."""
    rows, packed_columns = packed.shape
    out = torch.empty(rows, 2 * packed_columns, dtype=torch.float8_e4m3fn, device=packed.device)
    total_words = rows * packed_columns // 4
    grid = (triton.cdiv(total_words, WORDS_PER_PROGRAM),)
    wrap_triton(_decode_kernel)[grid](
        packed.view(torch.int32), block_scale, row_factor, out.view(torch.int64), total_words,
        packed_columns // 4, BLOCK=WORDS_PER_PROGRAM,
    )  # fmt: skip
    return out
