"""Export the configured encoders to ONNX and check them against the PyTorch engine (the first step of
`make engines`, issue 6; quantization and TensorRT plans come next).

    python tools/export_onnx.py [--config rag.toml] [--set section.key=value ...] [--out .cache/engines]

For each encoder: resolve the model as `triton-rag prepare` does, load the PyTorch engine in float32 on the CPU,
export `<out>/<encoder>/model.onnx` with the encoder's tensor contract, and run onnxruntime on batches of other
shapes with left and right padding; it fails unless the cosine to the engine is at least 0.9999.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from triton_rag import contract
from triton_rag.engines.torch_encoder import TorchEncoder
from triton_rag.onnx_export import export_encoder, parity, sample_batches
from triton_rag.settings import load_settings
from triton_rag.sources import resolve_model

PARITY_COSINE = 0.9999


def log(message: str) -> None:
    print(f"[export_onnx {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("rag.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, default=Path(".cache/engines"))
    args = parser.parse_args()
    settings = load_settings(args.config if args.config.exists() else None, args.overrides)
    failures = 0
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
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
