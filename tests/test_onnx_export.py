"""ONNX export of the encoders: the engine's contract (names, INT64 inputs, dynamic axes) and parity with the
PyTorch engine under onnxruntime on the CPU (cosine >= 0.9999 in float32), embeddings and reranker logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from triton_rag.engines.torch_encoder import TorchEncoder
from triton_rag.onnx_export import export_encoder, parity, sample_batches


@pytest.mark.parametrize("task", ["embed", "rerank"])
def test_exported_encoder_keeps_the_contract_and_matches_the_engine(
    task: str, float32_encoder: Callable[[str], TorchEncoder], tmp_path: Path
) -> None:
    engine = float32_encoder(task)
    path = export_encoder(engine, tmp_path / f"{task}.onnx", log=lambda _: None)
    graph = onnx.load(str(path)).graph
    int64 = onnx.TensorProto.INT64
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [
        ("INPUT_IDS", int64),
        ("ATTENTION_MASK", int64),
    ]
    assert all(not d.HasField("dim_value") for i in graph.input for d in i.type.tensor_type.shape.dim)  # dynamic
    (output,) = graph.output
    assert output.name == ("POOLED" if task == "embed" else "LOGITS")
    width = output.type.tensor_type.shape.dim[1].dim_value
    assert width == (engine.hidden_size if task == "embed" else 2)  # pooled rows, or the two logits only
    cosine, difference = parity(engine, path, sample_batches())
    assert cosine >= 0.9999 and difference <= 1e-4


def test_export_refuses_a_low_precision_engine(tiny_embed_dir: Path, tmp_path: Path) -> None:
    engine = TorchEncoder(tiny_embed_dir, "embed", dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match="float32 CPU engine"):
        export_encoder(engine, tmp_path / "x.onnx")
