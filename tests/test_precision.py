"""Precision choice (a pure function over the device and the engine) and the FP8 rowwise linear layers, whose
arithmetic is emulated in float32 on a CPU (the CUDA path runs the same quantized values on tensor cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from triton_rag.core.batching import pad_rows
from triton_rag.core.precision import Device, choose_precision, hardware_supports, nvfp4_mode
from triton_rag.engines.fp8 import FP8_MAX, Fp8Linear, convert_linears, quantize_rowwise
from triton_rag.engines.torch_encoder import ENGINE_PRECISIONS, TorchEncoder

H100, RTX_5070_TI, B200, A100, RTX_4090, T4, CPU = (
    Device((9, 0)),
    Device((12, 0)),
    Device((10, 0)),
    Device((8, 0)),
    Device((8, 9)),
    Device((7, 5)),
    Device(None),
)
EVERYTHING = frozenset({"nvfp4", "fp8", "bfloat16", "float32"})
NO_NVFP4 = frozenset({"fp8", "bfloat16", "float32"})


@pytest.mark.parametrize(
    ("requested", "device", "engine", "chosen", "steps"),
    [
        ("nvfp4", RTX_5070_TI, EVERYTHING, "nvfp4", 0),  # Blackwell consumer card: FP4 tensor cores
        ("nvfp4", H100, EVERYTHING, "nvfp4", 0),  # Hopper has no FP4: 4-bit storage, FP8 GEMMs
        ("nvfp4", RTX_4090, ENGINE_PRECISIONS, "nvfp4", 0),  # Ada likewise, in the PyTorch engine
        ("nvfp4", RTX_5070_TI, NO_NVFP4, "fp8", 1),  # an engine without NVFP4 layers
        ("nvfp4", A100, EVERYTHING, "bfloat16", 2),  # no FP8 before 8.9, so no NVFP4 either
        ("nvfp4", CPU, ENGINE_PRECISIONS, "float32", 3),
        ("fp8", RTX_4090, EVERYTHING, "fp8", 0),
        ("fp8", T4, EVERYTHING, "float32", 2),  # no bfloat16 before Ampere
        ("fp8", CPU, ENGINE_PRECISIONS, "float32", 2),
        ("auto", H100, ENGINE_PRECISIONS, "bfloat16", 0),
        ("auto", CPU, ENGINE_PRECISIONS, "float32", 0),
        ("bfloat16", CPU, ENGINE_PRECISIONS, "float32", 1),
    ],
)
def test_precision_falls_back_down_the_chain_with_reasons(requested, device, engine, chosen, steps) -> None:
    precision, reasons = choose_precision(requested, device, engine)
    assert precision == chosen and len(reasons) == steps
    assert all("falling back" in reason for reason in reasons)


@pytest.mark.parametrize(
    ("device", "mode"),
    [(B200, "native"), (RTX_5070_TI, "native"), (H100, "storage"), (RTX_4090, "storage"), (A100, None), (CPU, None)],
)
def test_nvfp4_runs_natively_on_blackwell_and_as_storage_where_fp8_runs(device: Device, mode: str | None) -> None:
    assert nvfp4_mode(device) == mode
    # a TensorRT plan's NVFP4 needs the FP4 tensor cores themselves: storage mode is the PyTorch engine's
    assert hardware_supports("nvfp4", device)[0] == (mode == "native")


def test_the_nvfp4_fallback_says_why() -> None:
    _, reasons = choose_precision("nvfp4", A100, EVERYTHING)
    assert reasons[0] == (
        "nvfp4 unavailable (NVFP4 needs FP4 (Blackwell) or FP8 (compute capability 8.9+) tensor cores, this GPU is "
        "(8, 0)): falling back"
    )
    _, reasons = choose_precision("nvfp4", RTX_5070_TI, NO_NVFP4)
    assert reasons == ["nvfp4 unavailable (this engine has no nvfp4 kernels): falling back"]


def test_rowwise_quantization_keeps_each_rows_range() -> None:
    torch.manual_seed(0)
    values = torch.randn(64, 512) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitudes
    quantized, scale = quantize_rowwise(values)
    assert quantized.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(quantized.float().abs().amax(dim=1), torch.full((64,), FP8_MAX))  # each row uses the range
    relative = ((quantized.float() * scale - values).norm(dim=1) / values.norm(dim=1)).max()
    assert relative < 0.05  # e4m3: 3 mantissa bits, about 2-3 % per row, whatever the row's magnitude


def test_fp8_linear_matches_the_bfloat16_layer_and_keeps_no_bfloat16_weights() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    expected = linear(x).float()
    layer = Fp8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (96, 256)
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.bfloat16
    cosine = torch.nn.functional.cosine_similarity(out.float().flatten(0, 1), expected.flatten(0, 1))
    assert cosine.min() > 0.998


def test_convert_linears_skips_the_head() -> None:
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)))
    model.add_module("lm_head", nn.Linear(16, 8))
    assert convert_linears(model) == 2
    assert isinstance(model.body[0], Fp8Linear) and isinstance(model.body[2], Fp8Linear)
    assert type(model.lm_head) is nn.Linear


def test_encoder_logs_its_fallback_and_still_matches_the_reference(tiny_embed_dir: Path) -> None:
    messages: list[str] = []
    fp8_requested = TorchEncoder(tiny_embed_dir, "embed", precision="fp8", device="cpu", log=messages.append)
    assert fp8_requested.precision == "float32" and any("fp8 unavailable (no GPU)" in m for m in messages)
    plain = TorchEncoder(tiny_embed_dir, "embed", device="cpu")
    ids, mask = pad_rows([[100, 200, 300], [7, 8]], pad_id=151643)
    np.testing.assert_array_equal(fp8_requested.forward(ids, mask), plain.forward(ids, mask))
