"""FP8 Q/DQ ONNX with ModelOpt on the CPU: the recipe touches MatMuls only, the quantized model stays close to the
float32 export under onnxruntime, and TensorRT-RTX builds it for SM120 (built, not run: no RTX 50 card here)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from triton_rag.build.export.onnx_export import export_encoder, sample_batches
from triton_rag.build.export.quantize import agreement, float16_shortfall, quantize_fp8, run_onnx
from triton_rag.build.export.trt_rtx import build_rtx_engine
from triton_rag.build.plans import encoder_profiles
from triton_rag.engines.torch_encoder import TorchEncoder


@pytest.fixture(scope="module")
def exported(tiny_embed_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny embedder in float32 and its FP8 Q/DQ version."""
    folder = tmp_path_factory.mktemp("fp8")
    engine = TorchEncoder(tiny_embed_dir, "embed", dtype="float32", device="cpu")
    fp32 = export_encoder(engine, folder / "model.onnx", log=lambda _: None)
    return fp32, quantize_fp8(fp32, folder / "model.fp8.onnx", log=lambda _: None)


def test_fp8_recipe_quantizes_matmul_inputs_only(exported: tuple[Path, Path]) -> None:
    graph = onnx.load(str(exported[1])).graph
    quantizers = [node for node in graph.node if node.op_type == "QuantizeLinear"]
    assert quantizers, "no Q/DQ nodes were inserted"
    consumers = Counter(
        consumer.op_type
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        for consumer in graph.node
        if node.output[0] in consumer.input
    )
    # MatMuls compute in FP8; the exporter's Shape nodes only read the dimensions; nothing else (no residual add,
    # no norm) sees quantized values
    assert set(consumers) - {"Shape"} == {"MatMul"}
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    zero_points = {init.name: init.data_type for init in graph.initializer}
    assert all(zero_points.get(node.input[2]) == fp8 for node in quantizers if len(node.input) > 2)


def test_fp8_onnx_stays_close_to_float32(exported: tuple[Path, Path]) -> None:
    """Measured on the tiny random model: min cosine ~0.98, mean ~0.99 (a quantization mistake, e.g. swapped
    scales, falls far below)."""
    reference, quantized = (run_onnx(path, sample_batches()) for path in exported)
    cosine = (reference * quantized).sum(axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1)
    )
    assert cosine.min() >= 0.95 and cosine.mean() >= 0.98
    assert agreement(reference, quantized) == f"cosine min {cosine.min():.4f}, mean {cosine.mean():.4f}"


def test_fp8_onnx_builds_into_an_sm120_engine(exported: tuple[Path, Path], tmp_path: Path) -> None:
    engine = tmp_path / "model.sm120.engine"
    manifest = build_rtx_engine(
        exported[1], engine, encoder_profiles(16, 512, 4096), "tiny", "qwen_embed_encoder", "fp8", log=lambda _: None
    )
    assert engine.stat().st_size > 1_000_000 and manifest.precision == "fp8"


def test_reranker_agreement_is_measured_on_its_score() -> None:
    reference = np.array([[0.0, 1.0], [1.0, -1.0], [0.5, 0.5]])
    candidate = reference + np.array([[0.0, 0.1], [0.2, 0.0], [0.0, 0.0]])
    assert agreement(reference, candidate) == "score (yes - no) max shift 0.2000 (scores span 3.0000)"


def test_a_float16_graph_stands_in_only_close_to_float32_and_finite() -> None:
    rows = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 1.0]])
    assert float16_shortfall(rows, rows * 1.001) is None
    assert "non-finite" in str(float16_shortfall(rows, np.where(rows > 1.5, np.inf, rows)))
    assert "cosine" in str(float16_shortfall(rows, rows[::-1]))
    logits = np.array([[0.0, 1.0], [1.0, -1.0], [0.5, 0.5]])  # scores 1, -2, 0: span 3
    assert float16_shortfall(logits, logits + np.array([[0.0, 0.1], [0.0, 0.0], [0.0, 0.0]])) is None  # 3%
    assert "more than 5%" in str(float16_shortfall(logits, logits + np.array([[0.0, 0.2], [0.0, 0.0], [0.0, 0.0]])))
