"""NVFP4 (engines/nvfp4.py) and the FP8 embedding table, on the CPU: the E2M1 codes and their packing, the
quantizer's rounding and error bounds, cuBLAS's block-scale layout against its documented formula, both forward
paths emulated in float32, and a tiny Qwen3 loaded through `load_qwen3` with NVFP4 and FP8. The GPU paths are in
test_nvfp4_cuda.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from triton_rag.engines.fp8 import FP8_MAX, Fp8Embedding
from triton_rag.engines.nvfp4 import (
    BLOCK,
    E2M1_VALUES,
    Nvfp4Linear,
    checked_mode,
    decode_e2m1,
    dequantize_nvfp4,
    encode_e2m1,
    native_gemm_problem,
    pack_nibbles,
    quantize_nvfp4,
    quantize_nvfp4_rowwise,
    swizzle_block_scales,
    unpack_nibbles,
    unswizzle_block_scales,
)
from triton_rag.engines.qwen3 import Qwen3Decoder, load_qwen3
from triton_rag.engines.weight_arena import WeightArena

CPU = torch.device("cpu")
#: Smallest normal E4M3 value: below it the spacing is absolute (2^-9), above it relative (2^-3 of the octave).
E4M3_TINY = 2.0**-6


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def test_the_sixteen_codes_decode_to_the_e2m1_table() -> None:
    values = decode_e2m1(torch.arange(16, dtype=torch.uint8))
    assert values.tolist() == list(E2M1_VALUES)
    assert torch.signbit(values).tolist() == [False] * 8 + [True] * 8  # code 8 is -0
    assert encode_e2m1(torch.tensor(E2M1_VALUES[1:8] + E2M1_VALUES[9:])).tolist() == [*range(1, 8), *range(9, 16)]


def test_packing_puts_the_first_code_in_the_low_nibble_and_round_trips() -> None:
    # the order of torch.float4_e2m1fn_x2 (pytorch's and torchao's pack_uint4): element 2i low, 2i+1 high
    assert pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_nibbles(unpack_nibbles(every_byte)), every_byte)
    assert unpack_nibbles(every_byte).view(256, 2).tolist() == [[byte % 16, byte // 16] for byte in range(256)]
    codes = torch.randint(0, 16, (33, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def _nearest_even_reference(values: torch.Tensor) -> torch.Tensor:
    """Round to the E2M1 grid by brute force: the nearest magnitude, an even code on a tie, 6 beyond it."""
    grid = torch.tensor(E2M1_VALUES[:8])
    distance = (values.abs()[:, None] - grid).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    even = nearest & (torch.arange(8) % 2 == 0)
    code = torch.where(even.any(dim=1), even.float().argmax(dim=1), nearest.float().argmax(dim=1))
    return code.to(torch.uint8) | ((values < 0).to(torch.uint8) << 3)


def test_e2m1_rounds_to_nearest_even_and_saturates() -> None:
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0]
    assert decode_e2m1(encode_e2m1(torch.tensor(ties))).tolist() == [0, 1, 1, 2, 2, 4, 4, -0.0, -4]
    beyond = torch.tensor([6.2, 7.0, 1e9, -100.0])
    assert decode_e2m1(encode_e2m1(beyond)).tolist() == [6, 6, 6, -6]
    values = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(1)) * 3, torch.tensor(ties)])
    assert torch.equal(encode_e2m1(values), _nearest_even_reference(values))


def test_values_exactly_representable_in_nvfp4_round_trip_exactly() -> None:
    """Codes times E4M3 block scales times a power-of-two global scale, each block holding a +-6 and one block the
    largest scale (448): the quantizer finds the same global and block scales and codes, so nothing is lost."""
    generator = torch.Generator().manual_seed(2)
    rows, blocks = 24, 8
    codes = torch.randint(0, 16, (rows, blocks, BLOCK), dtype=torch.uint8, generator=generator)
    codes[codes == 8] = 0  # -0 comes back as +0
    codes[:, :, 0] = 7 | (torch.randint(0, 2, (rows, blocks), dtype=torch.uint8, generator=generator) << 3)  # +-6
    e4m3 = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn)  # every positive finite E4M3 value
    scales = e4m3[torch.randint(0, len(e4m3), (rows, blocks), generator=generator)]
    scales[3, 5] = FP8_MAX
    global_scale = 2.0**-10
    weight = (decode_e2m1(codes) * scales.float().unsqueeze(-1) * global_scale).view(rows, blocks * BLOCK)
    packed, block_scale, found_global = quantize_nvfp4(weight)
    assert found_global.item() == global_scale
    assert torch.equal(block_scale.view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(packed, pack_nibbles(codes.view(rows, -1)))
    assert torch.equal(dequantize_nvfp4(packed, block_scale, found_global), weight)


def test_quantization_error_is_within_half_a_step_of_each_value() -> None:
    torch.manual_seed(3)
    weight = torch.randn(512, 1024) * torch.logspace(-2, 1, 512)[:, None]  # rows of very different magnitudes
    weight[7, 100:116] = 0.0  # an all-zero block
    packed, block_scale, global_scale = quantize_nvfp4(weight)
    assert packed.shape == (512, 512) and packed.dtype == torch.uint8
    assert block_scale.shape == (512, 64) and block_scale.dtype == torch.float8_e4m3fn
    assert global_scale.shape == () and global_scale.item() == pytest.approx(weight.abs().max().item() / (6 * 448))
    assert block_scale.float().max().item() == FP8_MAX  # the block holding the amax uses E4M3's whole range
    restored = dequantize_nvfp4(packed, block_scale, global_scale)
    assert torch.equal(restored[7, 100:116], torch.zeros(16))
    # per element: half the E2M1 step at the value's magnitude (0.5 below 2, 1 below 4, 2 above), in the units of
    # its block; E4M3's rounding of the block scale can leave a block's largest value up to 6 * 17/16, still below 7
    unit = (block_scale.float() * global_scale).repeat_interleave(BLOCK, dim=1)
    scaled = (weight / unit).abs()
    half_step = torch.where(scaled < 2, 0.25, torch.where(scaled < 4, 0.5, 1.0))
    assert ((weight - restored).abs() <= half_step * unit * (1 + 1e-6)).all()
    # overall on a Gaussian weight: ~9.5 % (per-tensor scaling alone would lose far more)
    gaussian = torch.randn(512, 1024)
    error = (dequantize_nvfp4(*quantize_nvfp4(gaussian)) - gaussian).norm() / gaussian.norm()
    assert error < 0.1


def test_rowwise_quantization_gives_each_row_its_own_global_scale() -> None:
    torch.manual_seed(4)
    values = torch.randn(6, 64) * torch.tensor([1e-3, 1.0, 1e3, 5.0, 0.1, 30.0])[:, None]
    packed, block_scale, global_scale = quantize_nvfp4_rowwise(values)
    assert global_scale.shape == (6, 1)
    assert torch.allclose(global_scale, values.abs().amax(dim=1, keepdim=True) / (6 * 448))
    relative = (dequantize_nvfp4(packed, block_scale, global_scale) - values).norm(dim=1) / values.norm(dim=1)
    assert relative.max() < 0.15  # every row, whatever its magnitude
    assert torch.equal(quantize_nvfp4_rowwise(values[2:3])[0], packed[2:3])  # a row alone quantizes the same


@pytest.mark.parametrize(("rows", "columns"), [(200, 7), (256, 8), (1, 1), (130, 64)])
def test_block_scale_swizzle_follows_the_cublas_formula(rows: int, columns: int) -> None:
    """cuBLAS's "1D block scaling factors layout": tiles of 128 rows x 4 scales (512 bytes) in row-major tile order;
    inside a tile, row r and column c at byte (r % 32) * 16 + (r // 32) * 4 + c. Padding is zero."""
    generator = torch.Generator().manual_seed(rows * 1000 + columns)
    scales = torch.randint(1, 127, (rows, columns), dtype=torch.uint8, generator=generator).view(torch.float8_e4m3fn)
    swizzled = swizzle_block_scales(scales)
    column_tiles = -(-columns // 4)
    assert swizzled.dtype == torch.float8_e4m3fn
    assert swizzled.numel() == -(-rows // 128) * column_tiles * 512
    flat = swizzled.view(torch.uint8)
    expected = torch.zeros_like(flat)
    for r in range(rows):
        for c in range(columns):
            tile = (r // 128) * column_tiles + c // 4
            expected[tile * 512 + (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4] = scales.view(torch.uint8)[r, c]
    assert torch.equal(flat, expected)
    assert torch.equal(unswizzle_block_scales(swizzled, rows, columns).view(torch.uint8), scales.view(torch.uint8))


def _layer(mode: str, bias: bool = True) -> tuple[nn.Linear, Nvfp4Linear]:
    torch.manual_seed(5)
    linear = nn.Linear(256, 96, bias=bias)
    return linear, Nvfp4Linear.from_linear(linear, mode)  # type: ignore[arg-type]


def test_the_storage_path_decodes_to_fp8_rows_and_matches_the_dequantized_matmul() -> None:
    linear, layer = _layer("storage")
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (96, 128)  # no copy of the float weight kept
    packed, block_scale, global_scale = quantize_nvfp4(linear.weight.detach())
    dequantized = dequantize_nvfp4(packed, block_scale, global_scale)
    # the FP8 weight times its row scales is the dequantized weight up to E4M3's rounding (half a step)
    fp8 = layer.fp8_weight()
    assert fp8.dtype == torch.float8_e4m3fn
    assert torch.equal(fp8.float().abs().amax(dim=1), torch.full((96,), FP8_MAX))  # each row uses E4M3's range
    row_scale = layer.weight_scale.t()
    bound = torch.maximum(dequantized.abs() / row_scale, torch.tensor(E4M3_TINY)) * 2.0**-4 * row_scale
    assert ((fp8.float() * row_scale - dequantized).abs() <= bound * (1 + 1e-6)).all()
    x = torch.randn(3, 5, 256)
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    expected = x @ dequantized.t() + linear.bias.detach()
    assert _cosines(out.flatten(0, 1), expected.flatten(0, 1)).min() > 0.999  # FP8 activations: ~2-3 % per row
    assert _cosines(out.flatten(0, 1), linear(x).detach().flatten(0, 1)).min() > 0.99  # and NVFP4's ~9.5 %


def test_the_native_path_emulated_reads_its_swizzled_scales_back() -> None:
    linear, native = _layer("native", bias=False)
    _, storage = _layer("storage", bias=False)
    assert native.weight_block_scale.dim() == 1  # kept in cuBLAS's layout
    assert torch.equal(native.weight, storage.weight)
    x = torch.randn(40, 256)
    activations = dequantize_nvfp4(*quantize_nvfp4_rowwise(x))
    weight = dequantize_nvfp4(storage.weight, storage.weight_block_scale, storage.weight_global_scale)
    assert torch.allclose(native(x), activations @ weight.t(), rtol=1e-5, atol=1e-5)
    assert _cosines(native(x), linear(x).detach()).min() > 0.98  # both operands 4-bit
    # a row's answer does not depend on its batch (a global scale over the batch would change its codes)
    assert torch.allclose(native(x[7:8]), native(x)[7:8], rtol=1e-5, atol=1e-6)


def test_an_input_dimension_off_the_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        Nvfp4Linear(40, 8, False, torch.bfloat16, "storage")


def test_the_fp8_embedding_table_dequantizes_the_rows_looked_up() -> None:
    torch.manual_seed(6)
    table = (torch.randn(1000, 64) * torch.logspace(-3, 1, 1000)[:, None]).to(torch.bfloat16)
    with torch.device("meta"):
        embedding = Fp8Embedding(1000, 64, out_dtype=torch.bfloat16)
    embedding.CHUNK_ROWS = 300  # several chunks, the last one short
    embedding.load_weight(table)
    assert embedding.weight.dtype == torch.float8_e4m3fn and embedding.weight_scale.shape == (1000, 1)
    assert embedding.weight.nbytes * 2 == table.nbytes
    ids = torch.tensor([[3, 999], [500, 3]])
    rows = embedding(ids)
    assert rows.shape == (2, 2, 64) and rows.dtype == torch.bfloat16
    row_scale = embedding.weight_scale[ids]
    dequantized = embedding.weight[ids].float() * row_scale
    assert torch.equal(rows, dequantized.to(torch.bfloat16))
    # each value within half an E4M3 step of the bfloat16 table's (absolute below E4M3's normals)
    expected = table[ids].float()
    bound = torch.maximum(expected.abs() / row_scale, torch.tensor(E4M3_TINY)) * 2.0**-4 * row_scale
    assert ((dequantized - expected).abs() <= bound * (1 + 1e-6)).all()


def _hidden(model: Qwen3Decoder, ids: list[int]) -> torch.Tensor:
    """One text through the decoder (what the engine's `_decoder` does): [tokens, hidden] after the final norm."""
    count = len(ids)
    hidden = model.embed_tokens(torch.tensor(ids))
    cos, sin = model.rotary_emb(torch.arange(count), hidden.dtype)
    bounds = torch.tensor([0, count], dtype=torch.int32)
    for layer in model.layers:
        hidden = layer(hidden, cos, sin, bounds, count)
    return model.norm(hidden).float()


@pytest.fixture(scope="module")
def tiny_ids() -> list[int]:
    return torch.randint(10, 150000, (300,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module")
def float32_hidden(tiny_embed_dir: Path, tiny_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return _hidden(load_qwen3(tiny_embed_dir, CPU, torch.float32, log=lambda _: None), tiny_ids)


@torch.inference_mode()
def test_a_tiny_qwen3_in_nvfp4_stays_close_to_float32(
    tiny_embed_dir: Path, tiny_ids: list[int], float32_hidden: torch.Tensor
) -> None:
    """The tiny random model (weights of std 0.2) amplifies errors: FP8 alone is at ~0.99 mean cosine per token. NVFP4
    is ~0.91 against float32 (rounding toward zero instead of to nearest: 0.81, per-tensor scales only: 0.89, the
    nibbles swapped: 0.03) and ~0.99 against the float32 model with the same NVFP4 weights dequantized, which leaves
    only the storage path's FP8 GEMMs (round toward zero: 0.70, per-tensor only: 0.83)."""
    messages: list[str] = []
    model = load_qwen3(tiny_embed_dir, CPU, torch.float32, precision="nvfp4", log=messages.append)
    assert "quantized as they landed: 14 linear layers to NVFP4 (storage:" in messages[0]
    assert "the embedding table to FP8 rows" in messages[0]
    hidden = _hidden(model, tiny_ids)
    assert _cosines(hidden, float32_hidden).mean() > 0.9
    fake = load_qwen3(tiny_embed_dir, CPU, torch.float32, log=lambda _: None)
    for module in fake.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(dequantize_nvfp4(*quantize_nvfp4(module.weight)))
    same_weights = _cosines(hidden, _hidden(fake, tiny_ids))
    assert same_weights.mean() > 0.98 and same_weights.min() > 0.95


@torch.inference_mode()
def test_a_tiny_qwen3_in_fp8_stays_close_to_float32(
    tiny_embed_dir: Path, tiny_ids: list[int], float32_hidden: torch.Tensor
) -> None:
    model = load_qwen3(tiny_embed_dir, CPU, torch.bfloat16, precision="fp8", log=lambda _: None)
    assert isinstance(model.embed_tokens, Fp8Embedding)
    cosines = _cosines(_hidden(model, tiny_ids), float32_hidden)
    assert cosines.mean() > 0.98 and cosines.min() > 0.9


@torch.inference_mode()
def test_a_weight_arena_keeps_nvfp4_and_fp8_tensors_through_sleep(tiny_embed_dir: Path, tiny_ids: list[int]) -> None:
    """uint8 weights, E4M3 scales and tables, 0-dim float32 global scales: into the arena's bytes and back."""
    model = load_qwen3(tiny_embed_dir, CPU, torch.bfloat16, precision="nvfp4", log=lambda _: None)
    before = _hidden(model, tiny_ids[:20])
    originals = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    arena = WeightArena(model, CPU, log=lambda _: None)
    arena.sleep()
    assert arena.arena.untyped_storage().nbytes() == 0
    arena.wake()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == originals[name].dtype and tensor.shape == originals[name].shape, name
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), originals[name].reshape(-1).view(torch.uint8)), name
    assert torch.equal(_hidden(model, tiny_ids[:20]), before)


@torch.inference_mode()
def test_a_host_embedding_table_gives_the_same_rows_and_stays_out_of_the_arena(
    tiny_embed_dir: Path, tiny_ids: list[int]
) -> None:
    """`host_embeddings`: the FP8 table leaves the module's tensors (the arena, the host tier and the device budget
    never see it); the lookups are the device table's, bit for bit, before and after a sleep."""
    messages: list[str] = []
    on_device = load_qwen3(tiny_embed_dir, CPU, torch.bfloat16, precision="fp8", log=lambda _: None)
    on_host = load_qwen3(tiny_embed_dir, CPU, torch.bfloat16, precision="fp8", log=messages.append,
                         host_embeddings=True)  # fmt: skip
    assert "the embedding table to FP8 rows in host memory" in messages[0]
    table = on_host.embed_tokens
    assert isinstance(table, Fp8Embedding) and table.host_view is not None
    assert "embed_tokens.weight" not in dict(on_host.named_parameters())
    assert torch.equal(table.host_view, on_device.embed_tokens.weight.view(torch.uint8))
    expected = _hidden(on_device, tiny_ids[:20])
    assert torch.equal(_hidden(on_host, tiny_ids[:20]), expected)
    device_arena = WeightArena(on_device, CPU, log=lambda _: None)
    host_arena = WeightArena(on_host, CPU, log=lambda _: None)
    assert device_arena.nbytes - host_arena.nbytes >= table.host_view.numel()  # the table is not in the arena
    host_arena.sleep()
    host_arena.wake()
    assert torch.equal(_hidden(on_host, tiny_ids[:20]), expected)


def test_the_native_probe_passes_where_the_native_path_computes_its_operands() -> None:
    assert native_gemm_problem(torch.device("cpu")) is None  # the CPU emulation of the native path


def test_the_native_probe_reports_a_gemm_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(self: Nvfp4Linear, rows: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")

    monkeypatch.setattr(Nvfp4Linear, "_native", refused)
    reason = native_gemm_problem(torch.device("cpu"))
    assert reason is not None and "failed its probe" in reason and "CUBLAS_STATUS_NOT_SUPPORTED" in reason


def test_the_native_probe_reports_a_gemm_that_computes_something_else(monkeypatch: pytest.MonkeyPatch) -> None:
    right = Nvfp4Linear._native
    monkeypatch.setattr(Nvfp4Linear, "_native", lambda self, rows: right(self, rows.flip(0)))  # rows mixed up
    reason = native_gemm_problem(torch.device("cpu"))
    assert reason is not None and "disagreed" in reason


def test_a_failed_probe_turns_native_layers_into_storage_and_says_why() -> None:
    lines: list[str] = []
    assert checked_mode("native", lambda: None, lines.append) == "native"
    assert checked_mode("storage", lambda: pytest.fail("storage needs no probe"), lines.append) == "storage"
    assert lines == []
    assert checked_mode("native", lambda: "the native NVFP4 GEMM failed its probe (x)", lines.append) == "storage"
    assert len(lines) == 1 and "failed its probe" in lines[0] and "storage" in lines[0]
