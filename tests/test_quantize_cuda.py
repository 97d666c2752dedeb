"""NVFP4 with ModelOpt: calibrated through its CUDA emulation, so deselected by default; on the GPU machine
(ModelOpt and the `quantize` extra installed):

    pytest -m gpu tests/test_quantize_cuda.py

The tiny random-weight encoders (the offline stand-ins) show that the recipe holds together: the emulated model
stays near float32, and the ONNX keeps the encoder contract with FP4 weights for a strongly typed TensorRT build.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from triton_rag.build.export.onnx_export import sample_batches
from triton_rag.build.export.quantize import quantize_nvfp4
from triton_rag.core.postprocess import row_cosine
from triton_rag.engines.torch_encoder import TorchEncoder

pytestmark = pytest.mark.gpu
# ModelOpt is the `quantize` extra, not installed everywhere a GPU is (the GPU machine's bundle does not carry it)
pytest.importorskip("modelopt", reason="nvidia-modelopt is not installed (the `quantize` extra)")


@pytest.mark.parametrize("task", ["embed", "rerank"])
def test_nvfp4_onnx_keeps_the_contract_and_stays_near_float32(
    float32_encoder: Callable[[str], TorchEncoder], tmp_path: Path, task: str
) -> None:
    engine = float32_encoder(task)
    path, reference, emulated = quantize_nvfp4(engine, tmp_path / "model.nvfp4.onnx", sample_batches())
    if task == "embed":
        cosine = row_cosine(reference, emulated)
        print(f"NVFP4 embed, emulated vs float32: cosine min {cosine.min():.4f} mean {cosine.mean():.4f}")
        assert cosine.min() >= 0.5 and cosine.mean() >= 0.8  # H100, 2026-11-27: 0.685 / 0.877 (hidden 64: 4 blocks)
    else:
        scores, quantized = reference[:, 1] - reference[:, 0], emulated[:, 1] - emulated[:, 0]
        print(f"NVFP4 rerank: score shift max {np.abs(quantized - scores).max():.4f}, span {np.ptp(scores):.4f}")
        assert np.abs(quantized - scores).max() <= 0.25 * np.ptp(scores)  # H100, 2026-11-27: 1.81 of 10.6
    model = onnx.load(str(path))
    weights = {t.name for t in model.graph.initializer}  # ModelOpt also lists the FP4 weights as (fed) inputs
    assert [i.name for i in model.graph.input if i.name not in weights] == ["INPUT_IDS", "ATTENTION_MASK"]
    assert [o.name for o in model.graph.output] == ["POOLED" if task == "embed" else "LOGITS"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 23
    fp4_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT4E2M1]
    linear_layers = 7 * 2  # q, k, v, o, gate, up, down in each of the 2 layers
    assert len(fp4_weights) == linear_layers
    print(Counter(node.op_type for node in model.graph.node))
