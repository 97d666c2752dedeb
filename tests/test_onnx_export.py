"""ONNX export of the encoders: the engine's contract (names, INT64 inputs, dynamic axes) and parity with the
PyTorch engine under onnxruntime on the CPU (cosine >= 0.9999 in float32), embeddings and reranker logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from triton_rag.build.export.onnx_export import export_encoder, parity, sample_batches
from triton_rag.engines.torch_encoder import TorchEncoder


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
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    width = output.type.tensor_type.shape.dim[1].dim_value
    assert width == (engine.hidden_size if task == "embed" else 2)  # pooled rows, or the two logits only
    cosine, difference = parity(engine, path, sample_batches())
    assert cosine >= 0.9999 and difference <= 1e-4


@pytest.mark.parametrize("task", ["embed", "rerank"])
def test_float16_export_computes_in_float16_keeps_the_contract_and_stays_close(
    task: str,
    float32_encoder: Callable[[str], TorchEncoder],
    tiny_embed_dir: Path,
    tiny_rerank_dir: Path,
    tmp_path: Path,
) -> None:
    """The plan chain's FP16 step: a float16 graph (weights and MatMuls) with the contract's INT64 inputs and float32
    output, close to the float32 engine for every row of batches padded either way."""
    model_dir, yes_no = (tiny_embed_dir, None) if task == "embed" else (tiny_rerank_dir, (2152, 9693))
    half = TorchEncoder(model_dir, task, dtype="float16", device="cpu", yes_no_ids=yes_no)  # type: ignore[arg-type]
    path = export_encoder(half, tmp_path / f"{task}.fp16.onnx", log=lambda _: None)
    graph = onnx.load(str(path)).graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.INT64] * 2
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    matmul_weights = {i for node in graph.node if node.op_type == "MatMul" for i in node.input}
    # every layer's weights; the reranker's 2-row head runs after pooling, in float32 like the output
    weights = [w for w in graph.initializer if w.name in matmul_weights and 2 not in w.dims]
    assert len(weights) >= 7 and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    cosine, difference = parity(float32_encoder(task), path, sample_batches())
    assert cosine >= 0.999 and difference <= 0.05


def test_export_refuses_a_bfloat16_engine(tiny_embed_dir: Path, tmp_path: Path) -> None:
    engine = TorchEncoder(tiny_embed_dir, "embed", dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match="float32 or float16 CPU engine"):
        export_encoder(engine, tmp_path / "x.onnx")
