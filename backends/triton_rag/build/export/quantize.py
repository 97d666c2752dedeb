"""FP8 and NVFP4 Q/DQ ONNX of the encoders with NVIDIA ModelOpt.

Q/DQ nodes are how FP8 reaches a TensorRT or TensorRT-RTX engine: a strongly typed build runs each quantized MatMul
on FP8 tensor cores with the calibrated scales (trtexec's precision flags cannot do this; docs/ENGINES.md). The recipe
quantizes MatMuls only: ModelOpt's default also quantizes the inputs of residual adds and norms, which on a Qwen3
stack costs far more accuracy (FACTS.md: cosine 0.63 against 0.995 on a toy model). FP8 is quantized on the ONNX
graph and checked with onnxruntime, all on the CPU.

NVFP4 (4-bit e2m1 values with an e4m3 scale per 16 and a float32 scale per tensor) has no ONNX-level recipe in
ModelOpt and no onnxruntime kernel: the engine's own module is quantized in PyTorch (`mtq.quantize`, the default
NVFP4 recipe: weights and inputs of every linear layer; the reranker's two head rows stay float32), its accuracy is
measured through ModelOpt's emulation, which runs on CUDA only, and ModelOpt's exporter writes the Q/DQ ONNX
(TensorRT's FP4 quantize op on activations, two-level dequantized FP4 weights, opset 23) for a strongly typed
TensorRT build. So NVFP4 needs a CUDA GPU to produce; the engine it becomes needs a Blackwell GPU to run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from triton_rag.core.postprocess import row_cosine

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from triton_rag.engines.torch_encoder import TorchEncoder

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
    log: Callable[[str], None] = _log.info,
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
    """The model's output rows for all batches (onnxruntime, CPU). Basic graph optimizations only: the extended
    ones fuse Q/DQ + MatMul into integer kernels (onnxruntime 1.30 builds an invalid MatMulIntegerToFloat for FP8),
    where the accuracy check wants the Q/DQ arithmetic as written."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"INPUT_IDS": i, "ATTENTION_MASK": m})[0] for i, m in batches])


def score_shift(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(largest shift of the reranker's score yes - no, the span of the reference scores): the score is what the
    endpoint turns into P(yes), so that is where two rerankers' [no, yes] logits are compared."""
    reference_score, candidate_score = reference[:, 1] - reference[:, 0], candidate[:, 1] - candidate[:, 0]
    return float(np.abs(candidate_score - reference_score).max()), float(np.ptp(reference_score))


def agreement(reference: np.ndarray, candidate: np.ndarray) -> str:
    """How far a quantized model's rows are from the float32 ones: embeddings by cosine per row, the reranker by
    its score (`score_shift`)."""
    if reference.shape[1] == 2:
        shift, spread = score_shift(reference, candidate)
        return f"score (yes - no) max shift {shift:.4f} (scores span {spread:.4f})"
    cosine = row_cosine(reference, candidate)
    return f"cosine min {cosine.min():.4f}, mean {cosine.mean():.4f}"


#: What a float16 export must keep of float32 (embedding cosine, reranker score shift as a share of the scores'
#: span): float16 only rounds, so falling short means overflow or a broken graph, not quantization error.
FLOAT16_MIN_COSINE = 0.99
FLOAT16_MAX_SHIFT_SHARE = 0.05


def float16_shortfall(reference: np.ndarray, candidate: np.ndarray) -> str | None:
    """Why a float16 graph's rows cannot stand in for the float32 ones (None: they can)."""
    if not np.isfinite(candidate).all():
        return "non-finite outputs (float16 overflow)"
    if reference.shape[1] == 2:
        shift, spread = score_shift(reference, candidate)
        if shift > FLOAT16_MAX_SHIFT_SHARE * spread:
            return f"scores shift by {shift:.4f}, more than {FLOAT16_MAX_SHIFT_SHARE:.0%} of their span {spread:.4f}"
        return None
    cosine = float(row_cosine(reference, candidate).min())
    return None if cosine >= FLOAT16_MIN_COSINE else f"cosine {cosine:.4f} < {FLOAT16_MIN_COSINE}"


def quantize_nvfp4(
    engine: TorchEncoder,
    out_path: Path,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    calibration: dict[str, np.ndarray] | None = None,
    log: Callable[[str], None] = _log.info,
) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write `out_path`, the NVFP4 Q/DQ ONNX of `engine` (a float32 CPU engine, left as it is); return it with the
    rows of `batches` by `engine` and by the emulated NVFP4 model (for `agreement`). Needs CUDA (ModelOpt's NVFP4
    emulation)."""
    import copy

    import modelopt.torch.quantization as mtq
    import onnx
    import torch
    from modelopt.torch._deploy.utils.torch_onnx import OnnxBytes, get_onnx_bytes_and_metadata

    from triton_rag.build.export.onnx_export import contract_module, output_name

    if not torch.cuda.is_available():
        raise RuntimeError("NVFP4 calibration runs through ModelOpt's CUDA emulation: it needs a CUDA GPU")
    log(f"quantizing the {engine.task} encoder to NVFP4 (ModelOpt, linear layers; emulated on CUDA)")
    reference = np.concatenate([engine.forward(ids, mask) for ids, mask in batches])
    module = copy.deepcopy(contract_module(engine)).cuda().eval()
    feed = calibration or calibration_inputs()

    def calibrate(model: torch.nn.Module) -> None:
        model(*(torch.from_numpy(feed[name]).cuda() for name in ("INPUT_IDS", "ATTENTION_MASK")))

    with torch.no_grad():
        mtq.quantize(module, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), forward_loop=calibrate)
        emulated = np.concatenate(
            [module(torch.from_numpy(i).cuda(), torch.from_numpy(m).cuda()).float().cpu().numpy() for i, m in batches]
        )
    sample = tuple(torch.from_numpy(feed[name][:2]).cuda() for name in ("INPUT_IDS", "ATTENTION_MASK"))
    axes = {name: {0: "rows", 1: "tokens"} for name in ("INPUT_IDS", "ATTENTION_MASK")}
    exported, _ = get_onnx_bytes_and_metadata(module, sample, dynamic_axes=axes)
    staging = out_path.parent / f"{out_path.stem}.staging"
    written = OnnxBytes.from_bytes(exported)
    written.write_to_disk(str(staging))
    graph = onnx.load(str(staging / f"{written.model_name}.onnx"))
    _rename_output(graph, output_name(engine))
    large = len(list(staging.iterdir())) > 1  # ModelOpt stored the weights outside the graph (over protobuf's 2 GB)
    onnx.save(graph, str(out_path), save_as_external_data=large, location=f"{out_path.name}.data")
    for file in staging.iterdir():
        file.unlink()
    staging.rmdir()
    return out_path, reference, emulated


def _rename_output(graph: object, name: str) -> None:
    """ModelOpt's exporter names the output after its own tree spec; the contract names it POOLED / LOGITS."""
    (output,) = graph.graph.output  # type: ignore[attr-defined]
    old = output.name
    for node in graph.graph.node:  # type: ignore[attr-defined]
        node.output[:] = [name if value == old else value for value in node.output]
        node.input[:] = [name if value == old else value for value in node.input]
    output.name = name
