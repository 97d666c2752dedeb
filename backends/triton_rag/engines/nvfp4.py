"""NVFP4 linear layers: 4-bit E2M1 weights, one FP8 (E4M3) scale per 16 elements along the input dimension and one
float32 scale per tensor, the format NVIDIA ModelOpt and TensorRT use. Weights are quantized as the checkpoint
streams in (as `fp8.Fp8Linear`): a loader may drop each bfloat16 weight as soon as it lands.

The recipe (ModelOpt's and torchao's): global = amax / (6 * 448), so the largest block scale uses E4M3's range;
block scale = block amax / 6 / global, rounded to E4M3; code = the E2M1 value nearest to w / (block scale * global)
(ties to even, saturating at 6). A weight costs 4.5 bits instead of FP8's 8.

Two forward paths, fixed at construction from the GPU's compute capability (`core.precision.nvfp4_mode`):

- **native** (Blackwell, 10.x / 12.x): activations quantized to NVFP4 in the layer (one global scale per token, so a
  text's result does not depend on its batch), one `torch._scaled_mm` on FP4 tensor cores with the block scales in
  cuBLAS's swizzled layout (`swizzle_block_scales`), the output multiplied by the two global scales. **Not run on a
  Blackwell card**: no such GPU was available to this project. The scale layout is tested on the CPU against cuBLAS's
  documented formula, and on a CPU the path is emulated in float32 from the swizzled scales; the GEMM call itself
  follows pytorch's NVFP4 `_scaled_mm` tests and torchao's NVFP4 linear, and is unverified.
- **storage** (Hopper / Ada, 8.9+: no FP4 tensor cores): the weight stays 4-bit in memory; each forward decodes it in
  one pass straight into FP8 with a per-output-row scale computed at load (on CUDA our Triton kernel,
  `nvfp4_decode.py`, which `torch.compile` compiles into the layer; elsewhere `fp8_weight`, the same values), then runs
  `fp8.rowwise_linear`, Fp8Linear's GEMM. It saves memory (0.5625 bytes a weight instead of 1), not compute.

On a CPU both are emulated in float32 with the same quantized values, which is how the tests check them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from triton_rag.core.precision import Device, Nvfp4Mode, nvfp4_mode
from triton_rag.engines.fp8 import FP8_MAX, rowwise_linear

_log = logging.getLogger(__name__)

#: Elements that share one E4M3 block scale (along the input dimension).
BLOCK = 16
#: Largest E2M1 magnitude.
E2M1_MAX = 6.0
#: The value of each 4-bit E2M1 code: bit 3 the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: Rounding to the E2M1 grid, magnitudes: the code counts the midpoints passed. At a midpoint the even code wins
#: (ties to even), so the midpoints below an odd code are passed only beyond them and those below an even code at them.
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
#: Smallest positive E4M3 value (a subnormal): block scales are kept at least this, never 0.
E4M3_SMALLEST = 2.0**-9
#: cuBLAS's block-scale tiles: 128 rows by 4 scales (64 elements of K), each tile 512 bytes.
TILE_ROWS, TILE_COLUMNS = 128, 4
#: The native path's probe (`native_gemm_problem`): rows, input and output features (whole scale tiles).
PROBE_SHAPE = (128, 256, 256)
#: The probe's result against float32 on the same quantized operands: bfloat16 output and the GEMM's accumulation
#: order are all that may differ.
PROBE_MIN_COSINE = 0.999


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2n] (each 0-15) -> bytes [..., n], two codes a byte, the first of each pair in the low
    nibble: the order of `torch.float4_e2m1fn_x2`, as pytorch builds it in its NVFP4 `_scaled_mm` tests
    (torch/testing/_internal/common_quantized.py, `pack_uint4`: `data[1::2] << 4 | data[::2]`) and torchao packs it
    (torchao/prototype/mx_formats/kernels.py, `pack_uint4`)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: bytes [..., n] -> codes [..., 2n]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def encode_e2m1(values: torch.Tensor) -> torch.Tensor:
    """float32 values -> uint8 E2M1 codes: round to nearest, ties to even, saturating at +-6 (NaN gives 0)."""
    magnitude = values.abs()
    code = torch.zeros_like(values, dtype=torch.uint8)
    for midpoint, tie_goes_up in _MIDPOINTS:
        code += (magnitude >= midpoint if tie_goes_up else magnitude > midpoint).to(torch.uint8)
    return code | ((values < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes -> float32 values (`E2M1_VALUES`), by exact integer arithmetic rather than a table, so no
    constant tensor has to reach the device (a copy a CUDA graph capture would refuse)."""
    exponent, mantissa = (codes >> 1) & 3, codes & 1
    quarters = torch.where(exponent == 0, mantissa << 1, (mantissa + 2) << exponent)  # the magnitude in units of 1/4
    magnitude = quarters.float() * 0.25
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def _quantize(values: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`values` [rows, K] with the amax its global scale comes from (a scalar, or [rows, 1] for one a row)."""
    rows, columns = values.shape
    if columns % BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension to be a multiple of {BLOCK}, not {columns}")
    global_scale = amax.float().clamp(min=1e-12) / (E2M1_MAX * FP8_MAX)
    blocks = values.float().reshape(rows, columns // BLOCK, BLOCK)
    scale_of_rows = global_scale.view(-1, 1)  # [1, 1] or [rows, 1]: broadcasts over the blocks
    block_scale = (blocks.abs().amax(dim=-1) / E2M1_MAX / scale_of_rows).clamp(E4M3_SMALLEST, FP8_MAX)
    block_scale = block_scale.to(torch.float8_e4m3fn)
    scaled = blocks / (block_scale.float() * scale_of_rows).unsqueeze(-1)
    return pack_nibbles(encode_e2m1(scaled).view(rows, columns)), block_scale, global_scale


def quantize_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] -> (packed uint8 [out, in/2], block scales float8_e4m3fn [out, in/16], global scale float32 []):
    weight ~= E2M1(codes) * block scale * global scale, one global scale for the tensor (ModelOpt's weights)."""
    return _quantize(weight, weight.abs().amax())


def quantize_nvfp4_rowwise(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `quantize_nvfp4` with one global scale per row ([rows, 1]): activations, whose tokens then quantize
    independently of the batch they came in."""
    return _quantize(values, values.abs().amax(dim=-1, keepdim=True))


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float32 [rows, K] from `quantize_nvfp4`'s (or `quantize_nvfp4_rowwise`'s) three tensors."""
    rows, blocks = block_scale.shape
    values = decode_e2m1(unpack_nibbles(packed)).view(rows, blocks, BLOCK) * block_scale.float().unsqueeze(-1)
    return values.view(rows, blocks * BLOCK) * global_scale


def swizzle_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """Block scales [rows, K/16] -> the flat layout cuBLAS reads for NVFP4 (cuBLAS docs, "1D block scaling factors
    layout"): zero-padded to tiles of 128 rows by 4 scales, tiles in row-major order, 512 bytes each; in a tile, the
    scale of row r and column c is at byte (r % 32) * 16 + (r // 32) * 4 + c. Our own code for the formula that
    pytorch's and torchao's `to_blocked` implement; the tests hold it to the formula."""
    rows, columns = scales.shape
    padded = nn.functional.pad(  # on bytes: padding has no float8 kernel; a zero byte is E4M3 0.0
        scales.view(torch.uint8), (0, (-columns) % TILE_COLUMNS, 0, (-rows) % TILE_ROWS)
    )
    row_tiles, column_tiles = padded.shape[0] // TILE_ROWS, padded.shape[1] // TILE_COLUMNS
    # row = tile * 128 + quarter * 32 + lane, column = column tile * 4 + within: bytes ordered (tile, column tile,
    # lane, quarter, within)
    tiles = padded.view(row_tiles, 4, 32, column_tiles, TILE_COLUMNS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(-1).view(scales.dtype)


def unswizzle_block_scales(swizzled: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """The inverse of `swizzle_block_scales`: [rows, columns] again (the CPU emulation of the native path)."""
    row_tiles, column_tiles = -(-rows // TILE_ROWS), -(-columns // TILE_COLUMNS)
    tiles = swizzled.view(torch.uint8).view(row_tiles, column_tiles, 32, 4, TILE_COLUMNS).permute(0, 3, 2, 1, 4)
    return tiles.reshape(row_tiles * TILE_ROWS, column_tiles * TILE_COLUMNS)[:rows, :columns].view(swizzled.dtype)


def mode_for(device: torch.device, log: Callable[[str], None] = _log.info) -> Nvfp4Mode:
    """The NVFP4 path for layers on `device`: the GPU's (`nvfp4_mode`), but storage where the native GEMM fails its
    probe (`native_gemm_problem`, logged); a CPU emulates the storage path. ValueError for a GPU with neither FP4 nor
    FP8 tensor cores (`choose_precision` never picks NVFP4 there)."""
    if device.type != "cuda":
        return "storage"
    capability = torch.cuda.get_device_capability(device)
    mode = nvfp4_mode(Device(capability))
    if mode is None:
        raise ValueError(f"NVFP4 needs compute capability 8.9 or newer, this GPU is {capability}")
    mode = checked_mode(mode, lambda: native_gemm_problem(device), log)
    if mode == "storage":  # the decode kernel's op, registered here on the loading thread: a first import while
        import triton_rag.engines.nvfp4_decode  # noqa: F401  - the compiler's imports run in the background (a
        # load's `import_compiler_in_background`) found torch._inductor half-initialised (ImportError, H200 run)
    return mode


def checked_mode(mode: Nvfp4Mode, problem: Callable[[], str | None], log: Callable[[str], None]) -> Nvfp4Mode:
    """`mode`, unless it is native and `problem()` names a reason the native GEMM cannot serve: then storage, which
    keeps the memory saving on FP8 GEMMs, rather than a load (or a request) that fails on the card it targets."""
    if mode == "native" and (reason := problem()) is not None:
        log(f"precision: {reason}; NVFP4 layers keep 4-bit weights and decode them to FP8 for each GEMM (storage)")
        return "storage"
    return mode


def native_gemm_problem(device: torch.device) -> str | None:
    """None when one native NVFP4 layer on `device` computes what the same quantized operands give in float32; else
    why not. Run once per load, before the layers are built: the native path has not run on a Blackwell card in this
    project, and cuBLAS refuses some NVFP4 operand layouts on SM120 before 13.6 (pytorch #198126)."""
    generator = torch.Generator().manual_seed(0)
    rows, inputs, outputs = PROBE_SHAPE
    weight = torch.randn(outputs, inputs, generator=generator)
    x = torch.randn(rows, inputs, generator=generator).to(torch.bfloat16)
    reference = dequantize_nvfp4(*quantize_nvfp4_rowwise(x.float())) @ dequantize_nvfp4(*quantize_nvfp4(weight)).t()
    try:
        with torch.device("meta"):
            layer = Nvfp4Linear(inputs, outputs, False, torch.bfloat16, "native")
        layer.load_weight(weight.to(device))
        got = layer(x.to(device)).float().cpu()
    except Exception as exc:  # noqa: BLE001 - cuBLAS refusing the layout, a torch without the recipe: any is a no
        return f"the native NVFP4 GEMM failed its probe ({type(exc).__name__}: {str(exc)[:200]})"
    cosine = float(nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0))
    if not cosine >= PROBE_MIN_COSINE:  # also NaN
        return f"the native NVFP4 GEMM disagreed with its float reference in its probe (cosine {cosine:.4f})"
    return None


class Nvfp4Linear(nn.Module):
    """A linear layer with an NVFP4 weight. Built empty (on the meta device, say) and given its weight by
    `load_weight`, which quantizes it. `mode` ("native" or "storage", see the module's docstring) decides the forward
    path and which scales the layer keeps:

    - `weight`: uint8 [out, in/2], two E2M1 codes a byte; `weight_global_scale`: float32 [];
    - native: `weight_block_scale`, E4M3, already swizzled for cuBLAS (flat);
    - storage: `weight_block_scale`, E4M3 [out, in/16]; `weight_scale` [1, out], the FP8 weight's row scales for the
      GEMM; `weight_row_factor` [out, 1] = global scale / row scale, which the decoding multiplies by.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, out_dtype: torch.dtype, mode: Nvfp4Mode
    ) -> None:
        super().__init__()
        if in_features % BLOCK:
            raise ValueError(f"NVFP4 needs in_features to be a multiple of {BLOCK}, not {in_features}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.out_dtype = out_dtype if out_dtype != torch.float32 else torch.bfloat16
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8), False)
        self.weight_global_scale: torch.Tensor
        self.weight_block_scale: torch.Tensor
        self.register_buffer("weight_global_scale", torch.empty(()))
        blocks = in_features // BLOCK
        if mode == "native":
            padded = -(-out_features // TILE_ROWS) * TILE_ROWS * -(-blocks // TILE_COLUMNS) * TILE_COLUMNS
            self.register_buffer("weight_block_scale", torch.empty(padded, dtype=torch.float8_e4m3fn))
        else:
            self.weight_scale: torch.Tensor
            self.weight_row_factor: torch.Tensor
            self.register_buffer("weight_block_scale", torch.empty(out_features, blocks, dtype=torch.float8_e4m3fn))
            self.register_buffer("weight_scale", torch.empty(1, out_features))
            self.register_buffer("weight_row_factor", torch.empty(out_features, 1))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=self.out_dtype), False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: Nvfp4Mode) -> Nvfp4Linear:
        weight = linear.weight.detach()
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, mode)
        layer.load_weight(weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(layer.out_dtype), False)
        return layer

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` [out, in] into this layer (the caller may free it afterwards)."""
        packed, block_scale, global_scale = quantize_nvfp4(weight)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight_global_scale = global_scale
        if self.mode == "native":
            self.weight_block_scale = swizzle_block_scales(block_scale)
            return
        self.weight_block_scale = block_scale
        if packed.is_cuda:  # registers the decode kernel's op (torch.ops.triton_rag.nvfp4_decode_fp8) for forward
            import triton_rag.engines.nvfp4_decode  # noqa: F401
        # the row scales of the FP8 weight each forward decodes to: set here, so no reduction runs at run time
        row_scale = dequantize_nvfp4(packed, block_scale, global_scale).abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        self.weight_scale = row_scale.view(1, -1)
        self.weight_row_factor = (global_scale / row_scale).view(-1, 1)

    def fp8_weight(self) -> torch.Tensor:
        """Storage path: the weight decoded straight into float8_e4m3fn [out, in], row r scaled by 1 / weight_scale[r]
        (one elementwise pass once compiled: unpack, decode, times the block scale and the row factor, cast)."""
        values = decode_e2m1(unpack_nibbles(self.weight)).view(self.out_features, -1, BLOCK)
        factors = self.weight_block_scale.float() * self.weight_row_factor  # [out, in/16]
        scaled = (values * factors.unsqueeze(-1)).view(self.out_features, self.in_features)
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    def _decoded_weight(self) -> torch.Tensor:
        """`fp8_weight`'s values; on CUDA from the decode kernel (registered by `load_weight` when the weight lands on
        the GPU; here for a layer moved there afterwards, `.to(cuda)`, where importing it is not yet done)."""
        if self.weight.is_cuda:
            import triton_rag.engines.nvfp4_decode  # noqa: F401  (registers the op; a no-op once imported)

            decode = torch.ops.triton_rag.nvfp4_decode_fp8
            return decode(self.weight, self.weight_block_scale, self.weight_row_factor)
        return self.fp8_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self.mode == "native":
            out = self._native(rows)
        else:
            out = rowwise_linear(rows, self._decoded_weight(), self.weight_scale, self.bias, self.out_dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _native(self, rows: torch.Tensor) -> torch.Tensor:
        """FP4 x FP4 on Blackwell's tensor cores (emulated in float32 on a CPU)."""
        count = rows.shape[0]
        if rows.is_cuda:  # whole scale tiles: the activation scales' swizzle is then a pure permutation
            rows = nn.functional.pad(rows, (0, 0, 0, (-count) % TILE_ROWS))
        packed, block_scale, global_scale = quantize_nvfp4_rowwise(rows)
        if rows.is_cuda:
            out = torch._scaled_mm(
                packed.view(torch.float4_e2m1fn_x2),
                self.weight.view(torch.float4_e2m1fn_x2).t(),  # column-major, as _scaled_mm wants its second operand
                scale_a=swizzle_block_scales(block_scale),
                scale_b=self.weight_block_scale,
                out_dtype=self.out_dtype,
            )[:count]
            out = out * (global_scale[:count] * self.weight_global_scale).to(out.dtype)
            # the bias after the global scales: _scaled_mm would add it to the unscaled product
            return out if self.bias is None else out + self.bias
        block_scales = unswizzle_block_scales(self.weight_block_scale, self.out_features, self.in_features // BLOCK)
        weight = dequantize_nvfp4(self.weight, block_scales, self.weight_global_scale)
        out = dequantize_nvfp4(packed, block_scale, global_scale) @ weight.t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(rows.dtype)
