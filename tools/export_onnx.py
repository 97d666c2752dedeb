"""Export the configured encoders to ONNX, check them against the PyTorch engine, quantize them, and build
TensorRT-RTX engines for RTX 50 from them (`make engines`, issue 6; full-TensorRT plans: docs/ENGINES.md).

    python tools/export_onnx.py [--config rag.toml] [--set section.key=value ...] [--out .cache/engines]
                                [--cache .cache] [--no-quantize] [--no-rtx]

For each encoder: resolve the model as `triton-rag prepare` does, load the PyTorch engine in float32 on the CPU,
export `<out>/<encoder>/model.onnx` with the encoder's tensor contract, and run onnxruntime on batches of other
shapes with left and right padding; it fails unless the cosine to the engine is at least 0.9999. Then quantize it
to FP8 Q/DQ (`model.fp8.onnx`, MatMuls only, ModelOpt calibrated on the CPU; the `quantize` extra) and report its
agreement with float32; on a machine with CUDA also to NVFP4 (`model.nvfp4.onnx`, ModelOpt's emulation). Then
export the engine's float16 forward as `model.fp16.onnx` (the plan chain's last step, for GPUs without FP8) and
report its agreement. Then, where TensorRT-RTX is installed (the `rtx` extra), build
`<out>/<encoder>/model.sm120.engine` from the best precision built here that the builder takes (NVFP4 with CUDA,
else FP8, then FP16) and its manifest, with optimization profiles from the
configuration (rows up to the encoder's max batch, tokens up to max_length). No GPU is needed to build; running
the engine needs an RTX 50 card.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from triton_rag import contract
from triton_rag.build.export.onnx_export import export_encoder, parity, sample_batches
from triton_rag.build.export.quantize import agreement, float16_shortfall, quantize_fp8, quantize_nvfp4, run_onnx
from triton_rag.build.plans import PLAN_CHAIN, configured_profiles, engine_source, plan_precision
from triton_rag.build.settings import load_settings, settings_file
from triton_rag.build.sources import resolve_model
from triton_rag.core import logs
from triton_rag.engines.torch_encoder import TorchEncoder

PARITY_COSINE = 0.9999
RTX_50 = (12, 0)


def log(message: str) -> None:
    print(f"[export_onnx {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="settings file (default: rag.toml where it exists)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, default=Path(".cache/engines"))
    parser.add_argument("--no-rtx", action="store_true", help="skip the TensorRT-RTX SM120 engines")
    parser.add_argument("--no-quantize", action="store_true", help="skip the FP8 Q/DQ ONNX (ModelOpt)")
    args = parser.parse_args()
    logs.configure()  # the library's progress lines (model builds, tokenizer download) on stderr
    rtx = not args.no_rtx and importlib.util.find_spec("tensorrt_rtx") is not None
    if not args.no_rtx and not rtx:
        log("TensorRT-RTX is not installed (pip install -e '.[rtx]'): ONNX only")
    settings = load_settings(settings_file(args.config, Path("rag.toml")), args.overrides)
    failures = 0
    profiles = configured_profiles(settings)
    for kind, name, encoder_settings in (
        ("embed", contract.EMBED_ENCODER, settings.embed),
        ("rerank", contract.RERANK_ENCODER, settings.rerank),
    ):
        model = resolve_model(encoder_settings.model, kind, args.cache, settings.offline_fallback, log)  # type: ignore[arg-type]
        yes_no = None
        if kind == "rerank":
            tokenizer = AutoTokenizer.from_pretrained(str(model.path))
            yes_no = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("no", "yes"))
        log(f"{name}: loading {model.path} in float32 on the CPU")
        engine = TorchEncoder(model.path, kind, dtype="float32", device="cpu", yes_no_ids=yes_no, log=log)  # type: ignore[arg-type]
        path = export_encoder(engine, args.out / name / "model.onnx", log)
        log(f"{name}: checking parity with onnxruntime")
        cosine, difference = parity(engine, path, sample_batches())
        verdict = "ok" if cosine >= PARITY_COSINE else f"FAILED (needs >= {PARITY_COSINE})"
        log(
            f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB), min cosine {cosine:.6f}, "
            f"max |diff| {difference:.2e}: {verdict}"
        )
        failures += cosine < PARITY_COSINE
        if cosine < PARITY_COSINE:
            continue
        built = {"float32": path}
        batches = sample_batches()
        float32_rows = run_onnx(path, batches)  # what FP8 and FP16 are measured against
        if not args.no_quantize:
            fp8 = quantize_fp8(path, path.with_name("model.fp8.onnx"), log=log)
            log(f"{name}: {fp8} against float32: {agreement(float32_rows, run_onnx(fp8, batches))}")
            built["fp8"] = fp8
            if torch.cuda.is_available():  # NVFP4's calibration is ModelOpt's CUDA emulation
                target = path.with_name("model.nvfp4.onnx")
                nvfp4, reference, emulated = quantize_nvfp4(engine, target, batches, log=log)
                log(f"{name}: {nvfp4} (emulated) against float32: {agreement(reference, emulated)}")
                built["nvfp4"] = nvfp4
            else:
                log(f"{name}: no NVFP4 ONNX: its calibration runs through ModelOpt's CUDA emulation (no GPU here)")
        # FP16, the plan chain's last step (GPUs without FP8), from the model's own float16 forward
        del engine
        half = TorchEncoder(model.path, kind, dtype="float16", device="cpu", yes_no_ids=yes_no, log=log)  # type: ignore[arg-type]
        fp16 = export_encoder(half, path.with_name("model.fp16.onnx"), log)
        del half
        fp16_rows = run_onnx(fp16, batches)
        shortfall = float16_shortfall(float32_rows, fp16_rows)
        verdict = "ok" if shortfall is None else f"FAILED ({shortfall}): not offered to the SM120 build"
        log(f"{name}: {fp16} against float32: {agreement(float32_rows, fp16_rows)}: {verdict}")
        failures += shortfall is not None
        if shortfall is None:
            built["float16"] = fp16
        if rtx:
            from triton_rag.build.export.trt_rtx import build_rtx_engine

            source = engine_source(encoder_settings.model, model.is_offline_stand_in)

            # the best precision RTX 50 runs, down the chain to one whose ONNX was built here and that the builder
            # takes (NVFP4 exists only where CUDA calibrated it; its SM120 build is not verified here)
            wanted, _ = plan_precision("nvfp4", RTX_50)
            chain = [p for p in (*PLAN_CHAIN[PLAN_CHAIN.index(wanted) :], "float32") if p in built]
            if chain[0] != wanted:
                log(f"{name}: no {wanted} ONNX here (its calibration needs a CUDA GPU): building {chain[0]}")
            plan = path.with_name("model.sm120.engine")
            for precision in chain:
                started = time.perf_counter()
                try:
                    build_rtx_engine(built[precision], plan, profiles[name], source, name, precision, log=log)
                except Exception as exc:  # the builder refused this precision: the next one down the chain
                    log(f"{name}: TensorRT-RTX could not build the {precision} ONNX ({exc}); trying the next precision")
                    continue
                log(
                    f"{name}: {plan} ({precision}, {plan.stat().st_size / 2**20:.1f} MiB, built in "
                    f"{time.perf_counter() - started:.0f} s, not run: needs an RTX 50 GPU) and its manifest"
                )
                break
            else:
                log(f"{name}: no SM120 engine: TensorRT-RTX built none of {', '.join(chain)}")
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
