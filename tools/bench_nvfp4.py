"""Where the NVFP4 storage path's time goes, one linear layer at a time: the FP8 layer, the NVFP4 layer as the engine
compiles it, its decode alone (inductor's fusion and our Triton kernel, `engines/nvfp4_decode.py`), and the FP8 GEMM
on an already decoded weight, for Qwen3-8B's seven linear shapes and several token counts. Needs a GPU with FP8.

    python3 tools/bench_nvfp4.py --out $OUT/nvfp4.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from triton_rag.engines.fp8 import Fp8Linear, rowwise_linear
from triton_rag.engines.nvfp4 import Nvfp4Linear

_log = logging.getLogger("bench_nvfp4")

#: Qwen3-8B's linear layers (out, in): q, k and v, o, gate and up, down.
SHAPES = {"q": (4096, 4096), "kv": (1024, 4096), "o": (4096, 4096), "gate_up": (12288, 4096), "down": (4096, 12288)}
#: How many of each shape a decoder layer has.
PER_LAYER = {"q": 1, "kv": 2, "o": 1, "gate_up": 2, "down": 1}


def milliseconds(fn, repeats: int = 20) -> float:
    """Median milliseconds of `fn()` on the GPU (CUDA events), after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_shape(name: str, out_features: int, in_features: int, tokens_list: list[int]) -> list[dict[str, Any]]:
    """One linear shape: the two decodes compared and timed, then each layer variant at each token count."""
    from triton_rag.engines.nvfp4_decode import decode_to_fp8

    device = torch.device("cuda")
    linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16, device=device)
    fp8 = Fp8Linear.from_linear(linear)
    nvfp4 = Nvfp4Linear.from_linear(linear, "storage")
    del linear

    def decode() -> torch.Tensor:
        return decode_to_fp8(nvfp4.weight, nvfp4.weight_block_scale, nvfp4.weight_row_factor)

    reference, ours = nvfp4.fp8_weight().view(torch.uint8), decode().view(torch.uint8)
    # as E4M3 byte codes of one sign, adjacent values differ by one: the largest step between the two decodes
    agreement = {
        "bytes_that_differ": int((reference != ours).sum()),
        "largest_code_step": int((reference.int() - ours.int()).abs().max()),
    }
    weight = reference.view(torch.float8_e4m3fn)
    compiled_fp8, compiled_nvfp4 = torch.compile(fp8), torch.compile(nvfp4)
    gemm = torch.compile(lambda x: rowwise_linear(x, weight, nvfp4.weight_scale, None, torch.bfloat16))
    decode_inductor = milliseconds(torch.compile(nvfp4.fp8_weight))
    decode_triton = milliseconds(decode)
    weight_bytes = out_features * in_features * 1.5625  # read 0.5 + 1/16 of scale, write 1
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, in_features, dtype=torch.bfloat16, device=device)
        row = {
            "shape": name,
            "out": out_features,
            "in": in_features,
            "tokens": tokens,
            "decode_agreement": agreement,
            "fp8_ms": milliseconds(lambda: compiled_fp8(x)),  # noqa: B023 - timed before x changes
            "nvfp4_compiled_ms": milliseconds(lambda: compiled_nvfp4(x)),  # noqa: B023
            "gemm_only_ms": milliseconds(lambda: gemm(x)),  # noqa: B023
            "decode_inductor_ms": decode_inductor,
            "decode_triton_ms": decode_triton,
            "decode_triton_gb_per_s": weight_bytes / decode_triton / 1e6,
            "decode_inductor_gb_per_s": weight_bytes / decode_inductor / 1e6,
        }
        _log.info(json.dumps(row))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    results = []
    for name, (out_features, in_features) in SHAPES.items():
        results += measure_shape(name, out_features, in_features, args.tokens)
    per_layer = {}
    for tokens in args.tokens:
        rows = [r for r in results if r["tokens"] == tokens]
        total = {
            key: sum(r[key] * PER_LAYER[r["shape"]] for r in rows)
            for key in ("fp8_ms", "nvfp4_compiled_ms", "gemm_only_ms", "decode_inductor_ms", "decode_triton_ms")
        }
        total["nvfp4_over_fp8"] = total["fp8_ms"] / total["nvfp4_compiled_ms"]
        per_layer[tokens] = total
        _log.info("per layer, %d tokens: %s", tokens, json.dumps(total))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results, "per_layer": per_layer}))


if __name__ == "__main__":
    main()
