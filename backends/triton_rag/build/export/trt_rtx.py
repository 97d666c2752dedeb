"""TensorRT-RTX engine builds ahead of time, on any machine: TensorRT-RTX compiles for a named compute capability
(SM120 = RTX 50) without a GPU, so a CPU machine (or CI) builds the engine an RTX 50 card then runs.

What this module does: ONNX (the encoder contract) -> serialized TensorRT-RTX engine for the target, with the
optimization profiles from `plans.encoder_profiles`, and the manifest beside it (`plans.Manifest`). Running the
engine needs that GPU; nothing here runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from triton_rag.build.plans import Manifest, Profile, manifest_file
from triton_rag.engines.trt_rtx_encoder import load_tensorrt_rtx

_log = logging.getLogger(__name__)

#: Targets TensorRT-RTX 1.7 can compile for, by compute capability (it has no SM90: H100/H200 engines need TensorRT).
RTX_TARGETS = {(12, 0): "SM120", (12, 1): "SM121", (8, 9): "SM89", (8, 6): "SM86", (8, 0): "SM80", (7, 5): "SM75"}


def build_rtx_engine(
    onnx_path: Path,
    engine_path: Path,
    profiles: list[Profile],
    source_model: str,
    contract: str,
    precision: str,
    capability: tuple[int, int] = (12, 0),
    log: Callable[[str], None] = _log.info,
) -> Manifest:
    """Build the engine for `capability` and write it with `<engine>.manifest.json` beside it; `precision` is what
    the ONNX carries (an unquantized export is float32; Q/DQ nodes make FP8/NVFP4), since TensorRT-RTX builds are
    strongly typed."""
    if capability not in RTX_TARGETS:
        raise ValueError(f"TensorRT-RTX cannot target compute capability {capability}; it can: {sorted(RTX_TARGETS)}")
    trt = load_tensorrt_rtx()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT-RTX could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, RTX_TARGETS[capability]), 0)
    profile = builder.create_optimization_profile()
    for item in profiles:
        profile.set_shape(item.input, item.min, item.opt, item.max)
    config.add_optimization_profile(profile)
    log(f"building a TensorRT-RTX {trt.__version__} engine for {RTX_TARGETS[capability]} from {onnx_path}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT-RTX failed to build {onnx_path} (its log above says why)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    manifest = Manifest(
        source_model=source_model,
        contract=contract,
        precision=precision,
        runtime="tensorrt-rtx",
        runtime_version=str(trt.__version__),
        compute_capability=capability,
        profiles=profiles,
    )
    manifest_file(engine_path).write_text(manifest.to_json())
    return manifest
