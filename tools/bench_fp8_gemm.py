"""FP8 GEMMs of one decoder layer for a few rows: cuBLASLt (`torch._scaled_mm`) against the skinny Triton kernel.

Times each of the layer's GEMM shapes (q, k, v, o, gate, up, down) for `--rows` tokens with triton's do_bench (the L2
cache flushed between runs, so the weights really stream from memory) and reports microseconds, the weight bytes
streamed per second, and the sum over the layer times the layer count: what the GEMMs of one forward pass cost.

    python tools/bench_fp8_gemm.py --shape 8b --out $OUT    # GPU only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from triton_rag.engines.fp8 import ALIGN, quantize_rowwise
from triton_rag.engines.fp8_skinny import fp8_skinny_mm
from triton_rag.offline import QWEN3_SHAPES


def layer_gemms(shape: str) -> dict[str, tuple[int, int]]:
    config = QWEN3_SHAPES[shape]
    hidden, heads, kv, head_dim, ffn = (
        config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
        config["intermediate_size"],
    )  # fmt: skip
    return {
        "q": (heads * head_dim, hidden), "k": (kv * head_dim, hidden), "v": (kv * head_dim, hidden),
        "o": (hidden, heads * head_dim), "gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b", choices=sorted(QWEN3_SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    layers = QWEN3_SHAPES[args.shape]["num_hidden_layers"]
    results = []
    for rows in args.rows:
        totals = {"cublas": 0.0, "skinny": 0.0}
        for name, (columns, inner) in layer_gemms(args.shape).items():
            x = torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(columns, inner, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_rowwise(x)
            wq, ws = quantize_rowwise(w)
            ws = ws.reshape(1, -1)
            pad = (-rows) % ALIGN
            xp = torch.nn.functional.pad(xq.float(), (0, 0, 0, pad)).to(torch.float8_e4m3fn)
            sp = torch.nn.functional.pad(xs, (0, 0, 0, pad), value=1.0)
            cublas = do_bench(lambda: torch._scaled_mm(xp, wq.t(), scale_a=sp, scale_b=ws, out_dtype=torch.bfloat16))
            skinny = do_bench(lambda: fp8_skinny_mm(xq, xs, wq, ws, torch.bfloat16))
            gigabytes = columns * inner / 1e9
            row = {
                "rows": rows, "gemm": name, "n": columns, "k": inner,
                "cublas_us": cublas * 1e3, "skinny_us": skinny * 1e3,
                "cublas_gbps": gigabytes / (cublas * 1e-3), "skinny_gbps": gigabytes / (skinny * 1e-3),
            }  # fmt: skip
            results.append(row)
            totals["cublas"] += cublas
            totals["skinny"] += skinny
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
        print(
            f"rows {rows}: one forward's GEMMs ({layers} layers) cuBLAS {totals['cublas'] * layers:.2f} ms, "
            f"skinny {totals['skinny'] * layers:.2f} ms"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fp8_gemm_{args.shape}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
