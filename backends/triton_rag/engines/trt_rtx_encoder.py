"""A TensorRT-RTX engine behind the encoder contract, for the python model `python_trt_rtx` variant (Triton has no
backend for TensorRT-RTX engines): ids and mask in, the engine's POOLED rows or LOGITS out, on the GPU.

Not run in this project's tests or benchmarks: the engines target RTX 50 (SM120) cards and neither the CI machines
nor the H100 machine are one. The engine itself carries pooling and the reranker head (exported from the PyTorch
engine's modules, tools/export_onnx.py), so this class only binds tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from triton_rag.engines.encoder_common import validate_encoder_inputs


def load_tensorrt_rtx() -> Any:
    """The tensorrt_rtx module, or a RuntimeError that says how to install it."""
    try:
        import tensorrt_rtx
    except ImportError as exc:
        raise RuntimeError(
            "TensorRT-RTX is not installed: pip install 'tensorrt-rtx-cu13==1.7.1.116' (or the `rtx` extra)"
        ) from exc
    return tensorrt_rtx


class TrtRtxEncoder:
    def __init__(self, engine_file: Path, model_dir: Path, output_name: str) -> None:
        import torch

        trt = load_tensorrt_rtx()
        if not torch.cuda.is_available():
            raise RuntimeError(f"{engine_file}: a TensorRT-RTX engine needs its GPU, and no CUDA device is visible")
        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_file}: TensorRT-RTX could not load it (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        self.output_name = output_name
        self.vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
        self.device = torch.device("cuda")

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        validate_encoder_inputs(input_ids, attention_mask, self.vocab_size)
        torch = self.torch
        inputs = {
            "INPUT_IDS": torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device),
            "ATTENTION_MASK": torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)).to(self.device),
        }
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"{name} {list(tensor.shape)} is outside the engine's optimization profile")
        output = torch.empty(
            tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32, device=self.device
        )
        for name, tensor in [*inputs.items(), (self.output_name, output)]:
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT-RTX failed to run the engine")
        return output.cpu().numpy()
