"""FP8 Q/DQ ONNX of the encoders with NVIDIA ModelOpt, calibrated and checked on the CPU (onnxruntime).

Q/DQ nodes are how FP8 reaches a TensorRT or TensorRT-RTX engine: a strongly typed build runs each quantized MatMul
on FP8 tensor cores with the calibrated scales (trtexec's precision flags cannot do this; docs/ENGINES.md). The recipe
quantizes MatMuls only: ModelOpt's default also quantizes the inputs of residual adds and norms, which on a Qwen3
stack costs far more accuracy (FACTS.md: cosine 0.63 against 0.995 on a toy model). NVFP4 is calibrated through
ModelOpt's CUDA emulation, so it needs a GPU machine and is not done here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from triton_rag.postprocess import row_cosine

#: The recipe: FP8 (e4m3) Q/DQ on MatMul inputs only, everything else in the export's float32.
FP8_OPS = ("MatMul",)


def calibration_inputs(rows: int = 8, tokens: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Calibration batch in the contract's names: random token ids (the offline models have random weights too;
    a real model should be calibrated on real text, `calibration` argument)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 100000, size=(rows, tokens)).astype(np.int64)
    return {"INPUT_IDS": ids, "ATTENTION_MASK": np.ones_like(ids)}


def quantize_fp8(
    onnx_path: Path,
    out_path: Path,
    calibration: dict[str, np.ndarray] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write `out_path`: `onnx_path` with FP8 Q/DQ around every MatMul's inputs, scales calibrated on the CPU."""
    import modelopt.onnx.quantization as modelopt_quantization

    log(f"quantizing {onnx_path} to FP8 (MatMuls only; ModelOpt, calibrated on the CPU)")
    logging.getLogger("modelopt").setLevel(logging.WARNING)
    modelopt_quantization.quantize(
        str(onnx_path),
        quantize_mode="fp8",
        calibration_data=calibration or calibration_inputs(),
        calibration_eps=["cpu"],
        op_types_to_quantize=list(FP8_OPS),
        high_precision_dtype="fp32",
        output_path=str(out_path),
        log_level="WARNING",
    )
    if not out_path.exists():
        raise RuntimeError(f"ModelOpt wrote no {out_path}")
    return out_path


def run_onnx(path: Path, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The model's output rows for all batches (onnxruntime, CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"INPUT_IDS": i, "ATTENTION_MASK": m})[0] for i, m in batches])


def agreement(reference: np.ndarray, candidate: np.ndarray) -> str:
    """How far a quantized model's rows are from the float32 ones: embeddings by cosine per row, the reranker's
    [no, yes] logits by its score (yes - no), which is what the endpoint turns into P(yes)."""
    if reference.shape[1] == 2:
        shift = np.abs((candidate[:, 1] - candidate[:, 0]) - (reference[:, 1] - reference[:, 0]))
        spread = float(np.ptp(reference[:, 1] - reference[:, 0]))
        return f"score (yes - no) max shift {shift.max():.4f} (scores span {spread:.4f})"
    cosine = row_cosine(reference, candidate)
    return f"cosine min {cosine.min():.4f}, mean {cosine.mean():.4f}"
