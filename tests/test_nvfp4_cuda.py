"""NVFP4 on the GPU (engines/nvfp4.py): the storage path's FP8 GEMM against its CPU emulation and a float reference,
the native FP4 GEMM where the GPU has FP4 tensor cores (Blackwell; skipped elsewhere), and the engine with
precision="nvfp4" against bfloat16. Deselected by default (no GPU on CI); on the GPU machine:

    pytest -m gpu tests/test_nvfp4_cuda.py

The model is the test fixtures' tiny Qwen3 (`TINY_QWEN3`, the embedder's seed), built here with transformers so the
tests need no tokenizer. Its random weights (std 0.2) amplify every rounding, which is what the floors below allow
for. Measured on an H200 (torch 2.11, 2026-12): the pooled rows in NVFP4 at cosine 0.883-0.951 to bfloat16 and
0.981-0.996 to bfloat16 with the same NVFP4 weights dequantized (what is left is the FP8 GEMM, as for
precision="fp8"), eager and compiled alike; alone and batched agree to 1.0000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from triton_rag.build.offline import TINY_QWEN3
from triton_rag.core.batching import pad_rows
from triton_rag.engines.nvfp4 import (
    Nvfp4Linear,
    dequantize_nvfp4,
    native_gemm_problem,
    quantize_nvfp4,
    quantize_nvfp4_rowwise,
)
from triton_rag.engines.torch_encoder import TorchEncoder

pytestmark = pytest.mark.gpu

ROWS = [list(np.random.default_rng(n).integers(10, 150000, size=n)) for n in (5, 16, 300, 77, 512, 1, 129, 40)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    return torch.device("cuda")


def _layer(mode: str) -> tuple[nn.Linear, Nvfp4Linear, torch.Tensor]:
    """A bfloat16 layer of an 8B model's proportions, its NVFP4 twin (on the CPU) and 37 rows of input."""
    torch.manual_seed(0)
    linear = nn.Linear(1024, 384, bias=True).to(torch.bfloat16)
    return linear, Nvfp4Linear.from_linear(linear, mode), torch.randn(37, 1024, dtype=torch.bfloat16)  # type: ignore[arg-type]


def test_the_storage_path_on_the_gpu_matches_its_emulation_and_the_float_reference(cuda: torch.device) -> None:
    linear, layer, x = _layer("storage")
    emulated = layer(x)  # on the CPU: the same quantized values, multiplied in float32
    weight = dequantize_nvfp4(*quantize_nvfp4(linear.weight.detach()))
    reference = x.float() @ weight.t() + linear.bias.detach().float()
    layer.to(cuda)
    assert torch.equal(
        dequantize_nvfp4(layer.weight, layer.weight_block_scale, layer.weight_global_scale).cpu(), weight
    )
    eager = layer(x.to(cuda))
    compiled = torch.compile(layer)(x.to(cuda))
    for out in (eager, compiled):
        assert out.dtype == torch.bfloat16 and out.shape == (37, 384)
        assert _relative(out.cpu(), emulated) < 0.01  # the same FP8 operands; bfloat16 output and accumulation order
        assert _relative(out.cpu(), reference) < 0.05  # FP8 activations and weight rounding: ~2-3 %


def test_the_native_probe_answers_for_this_gpu(cuda: torch.device) -> None:
    """On Blackwell the probe passes (the layers run native); elsewhere cuBLAS has no FP4 GEMM (FACTS.md: it answers
    CUBLAS_STATUS_NOT_SUPPORTED on SM90), so the probe reports it: the fallback that keeps a card whose FP4 GEMM
    fails on the storage path, exercised on real hardware."""
    problem = native_gemm_problem(cuda)
    if torch.cuda.get_device_capability(cuda)[0] in (10, 12):
        assert problem is None
    else:
        assert problem is not None and "failed its probe" in problem, problem


def test_the_native_path_runs_on_fp4_tensor_cores(cuda: torch.device) -> None:
    major, minor = torch.cuda.get_device_capability(cuda)
    if major not in (10, 12):
        pytest.skip(f"no FP4 tensor cores on this GPU (sm_{major}{minor}): the native NVFP4 GEMM needs Blackwell")
    linear, layer, x = _layer("native")
    emulated = layer(x)  # on the CPU: dequantized activations and weight, from the swizzled scales read back
    weight = dequantize_nvfp4(*quantize_nvfp4(linear.weight.detach()))
    reference = dequantize_nvfp4(*quantize_nvfp4_rowwise(x)) @ weight.t() + linear.bias.detach().float()
    layer.to(cuda)
    out = layer(x.to(cuda))
    assert out.dtype == torch.bfloat16 and out.shape == (37, 384)
    assert _relative(out.cpu(), emulated) < 0.01
    assert _relative(out.cpu(), reference) < 0.01
    assert _relative(layer(x[5:6].to(cuda)).cpu(), out[5:6].cpu()) < 0.01  # a row alone as in the batch


@pytest.fixture(scope="module")
def model_dir(cuda: torch.device, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny embedder of the test fixtures (build_tiny_qwen3's config and seed), without its tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-qwen3")
    torch.manual_seed(1234)
    Qwen3Model(Qwen3Config(**TINY_QWEN3, tie_word_embeddings=True)).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def same_weights_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model with each linear weight replaced by its NVFP4 values (quantized from bfloat16, as the engine
    does): run in bfloat16, it differs from the NVFP4 engine only by the FP8 GEMMs."""
    directory = tmp_path_factory.mktemp("tiny-qwen3-nvfp4-weights")
    (directory / "config.json").write_text((model_dir / "config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    for name, tensor in tensors.items():
        if name.endswith("_proj.weight"):
            tensors[name] = dequantize_nvfp4(*quantize_nvfp4(tensor.to(torch.bfloat16)))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _encode(encoder: TorchEncoder) -> np.ndarray:
    return encoder.forward(*pad_rows(ROWS, 0))


def _alone(encoder: TorchEncoder) -> np.ndarray:
    return np.concatenate([encoder.forward(np.array([row]), np.ones((1, len(row)), dtype=np.int64)) for row in ROWS])


@pytest.mark.parametrize("compiled", [False, True])
def test_the_engine_in_nvfp4_is_close_to_bfloat16_alone_and_batched(
    model_dir: Path, same_weights_dir: Path, compiled: bool, tmp_path: Path
) -> None:
    """Packed passes and graph replays, eager and compiled: every row close to bfloat16 and closer to bfloat16 with
    the same NVFP4 weights, the same row alone (a graph replay) and inside the batch (a packed pass) closer still.
    Eager, the weights also go through a sleep and a wake of the weight arena."""
    messages: list[str] = []
    encoder = TorchEncoder(
        model_dir, "embed", precision="nvfp4", compile_model=compiled, max_batch_tokens=600,
        precompiled_dir=tmp_path, sleepable=not compiled, log=messages.append,
    )  # fmt: skip
    assert encoder.precision == "nvfp4" and encoder.dtype == torch.bfloat16
    assert any("linear layers to NVFP4" in message for message in messages), messages
    batched, alone = _encode(encoder), _alone(encoder)
    bfloat16 = _encode(TorchEncoder(model_dir, "embed", precision="bfloat16", max_batch_tokens=600))
    same_weights = _encode(TorchEncoder(same_weights_dir, "embed", precision="bfloat16", max_batch_tokens=600))
    assert _cosines(batched, bfloat16).min() >= 0.85
    assert _cosines(batched, same_weights).min() >= 0.97
    assert _cosines(alone, same_weights).min() >= 0.97
    assert _cosines(alone, batched).min() >= 0.999  # per-token activation scales: a row does not see its batch
    assert encoder._graphs  # the short rows ran as graph replays
    if encoder.arena is not None:
        encoder.sleep()
        encoder.wake()
        np.testing.assert_array_equal(_encode(encoder), batched)


def test_a_host_embedding_table_reads_the_same_rows_over_the_bus(model_dir: Path) -> None:
    """The FP8 table in pinned host memory, gathered by the device through a zero-copy view (in graph replays and
    packed passes): the same outputs as the table on the device, bit for bit, and the table's bytes off the GPU."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    on_host = TorchEncoder(model_dir, "embed", precision="fp8", max_batch_tokens=600, host_embeddings=True)
    host_bytes = torch.cuda.memory_allocated() - before
    table = on_host.model.embed_tokens
    assert table.host_table is not None and not table.host_table.is_cuda and table.host_view.is_cuda
    batched, alone = _encode(on_host), _alone(on_host)
    before = torch.cuda.memory_allocated()
    on_device = TorchEncoder(model_dir, "embed", precision="fp8", max_batch_tokens=600)
    device_bytes = torch.cuda.memory_allocated() - before
    np.testing.assert_array_equal(batched, _encode(on_device))
    np.testing.assert_array_equal(alone, _alone(on_device))
    assert device_bytes - host_bytes >= 0.9 * table.host_table.numel(), (device_bytes, host_bytes)


@pytest.mark.parametrize("shape", [(384, 1024), (4096, 12288), (1000, 48)])
def test_the_decode_kernel_writes_the_fp8_weight_of_the_torch_decode(
    cuda: torch.device, shape: tuple[int, int]
) -> None:
    """engines/nvfp4_decode.py (what the storage path runs on CUDA) against `Nvfp4Linear.fp8_weight` (the same
    arithmetic in torch ops): the FP8 values, including a shape whose rows do not fill the kernel's blocks."""
    torch.manual_seed(1)
    linear = nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16, device=cuda)
    layer = Nvfp4Linear.from_linear(linear, "storage")
    expected = layer.fp8_weight().float()
    got = torch.ops.triton_rag.nvfp4_decode_fp8(layer.weight, layer.weight_block_scale, layer.weight_row_factor)
    assert got.dtype == torch.float8_e4m3fn and got.shape == shape
    differ = int((got.float() != expected).sum())  # as values: the code -0 may decode to +0 (the same in a GEMM)
    assert differ == 0, f"{differ} of {expected.numel()} FP8 values differ"
