"""FP8 GEMM for a few rows (a short query, a small batch): a split-K Triton kernel that streams the weights.

With 16 rows an 8B encoder's GEMMs are bound by reading 7.6 GB of FP8 weights, not by arithmetic. cuBLASLt picks
128x128 tiles there and reaches 44% of an H100's memory bandwidth (BENCHMARKS.md, profile of the 16-token query).
This kernel gives every block a thin slice of output columns and a share of the reduction (split K), so enough
blocks are in flight to keep the memory busy; the partial sums meet by atomic adds in float32.

The arithmetic is `torch._scaled_mm`'s: FP8 x FP8 products accumulated in float32, then the row scale of the
activation times the column scale of the weight. So a text gives the same numbers whether it runs alone (here) or
inside a larger batch (cuBLAS), up to the order of the float32 additions.

CUDA only (Triton); `available()` says whether it can run. Exposed as a torch custom op so that compiled layers call
it as one opaque kernel and CUDA graphs capture it.
"""

from __future__ import annotations

import importlib.util

import torch

#: Up to this many rows the kernel is used; more rows are compute-bound enough for cuBLAS's big tiles.
SKINNY_MAX_ROWS = 64


def available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _build() -> object:
    import triton
    import triton.language as tl

    # split K so that about four blocks per SM are in flight, each over at least one BLOCK_K slice
    def split_k(args: dict) -> int:
        tiles = triton.cdiv(args["N"], args["BLOCK_N"])
        slices = triton.cdiv(args["K"], args["BLOCK_K"])
        return max(1, min(slices, (4 * args["SMS"] + tiles - 1) // tiles))

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in ((32, 256, 4, 4), (64, 256, 4, 4), (64, 128, 4, 6), (128, 128, 8, 4), (64, 512, 8, 3))
        ],
        key=["BLOCK_M", "N", "K"],
        reset_to_zero=["out_ptr"],
    )
    @triton.heuristics({"SPLIT_K": split_k})
    @triton.jit
    def skinny_kernel(
        x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, out_ptr, M, N, K, SMS,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        inner = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
            k = inner + start * BLOCK_K * SPLIT_K
            x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + cols[:, None] * K + k[None, :], mask=(cols[:, None] < N) & (k[None, :] < K), other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        x_scale = tl.load(x_scale_ptr + rows, mask=rows < M, other=0.0)
        w_scale = tl.load(w_scale_ptr + cols, mask=cols < N, other=0.0)
        acc = acc * x_scale[:, None] * w_scale[None, :]
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.atomic_add(out_ptr + rows[:, None] * N + cols[None, :], acc, mask=mask, sem="relaxed")

    return skinny_kernel


_kernel: object | None = None


@torch.library.custom_op("triton_rag::fp8_skinny_mm", mutates_args=())
def fp8_skinny_mm(
    x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """x [M, K] float8_e4m3fn with x_scale [M, 1]; weight [N, K] float8_e4m3fn (row-major) with weight_scale [1, N]
    -> [M, N] of out_dtype, M <= SKINNY_MAX_ROWS."""
    global _kernel
    if _kernel is None:
        _kernel = _build()
    rows, inner = x.shape
    columns = weight.shape[0]
    out = torch.zeros((rows, columns), dtype=torch.float32, device=x.device)
    block_m = max(16, 1 << (rows - 1).bit_length())
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count

    def grid(meta: dict) -> tuple[int, int]:
        return ((columns + meta["BLOCK_N"] - 1) // meta["BLOCK_N"], meta["SPLIT_K"])

    _kernel[grid](  # type: ignore[index]
        x.contiguous(), weight, x_scale.contiguous(), weight_scale.contiguous(), out,
        rows, columns, inner, sms, BLOCK_M=block_m,
    )  # fmt: skip
    return out.to(out_dtype)


@fp8_skinny_mm.register_fake
def _(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)
