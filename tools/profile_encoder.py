"""Where an encoder call's time goes (issue 5's "profile of what dominates"): the engine driven the way the endpoint
drives it inside Triton - a dynamic batch of `--rows` random texts of 32-512 tokens, cut into encoder calls as the
endpoint cuts them (`plan_encoder_calls`), one `forward` per call - timed per call (host wall time, GPU time by CUDA
events), then one batch under torch.profiler with the top operators by host and device time.

    python tools/profile_encoder.py --shape 0.6b --precision bfloat16 --out $OUT
    python tools/profile_encoder.py --shape 8b --precision fp8 --rows 1 --lengths 16 16 --out $OUT   # one query
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from triton_rag import contract
from triton_rag.build.offline import QWEN3_SHAPES, build_random_qwen3
from triton_rag.core.batching import pad_rows, plan_encoder_calls
from triton_rag.engines.torch_encoder import TorchEncoder

PAD_ID = 151643


def batch_calls(rng: np.random.Generator, rows: int, low: int, high: int) -> list[tuple[np.ndarray, np.ndarray]]:
    texts = [rng.integers(1000, 100000, size=int(n)).tolist() for n in rng.integers(low, high + 1, size=rows)]
    groups = plan_encoder_calls([len(t) for t in texts], contract.embed_encoder(1).max_batch_size, 32768)
    return [pad_rows([texts[i] for i in group], PAD_ID) for group in groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.6b", choices=sorted(QWEN3_SHAPES))
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs=2, default=[32, 512], metavar=("LOW", "HIGH"))
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shape = QWEN3_SHAPES[args.shape]
    model_dir = build_random_qwen3(
        "embed", args.work / f"qwen3-{args.shape}-embed", Path(".cache"), shape, print, "bfloat16", "cuda"
    )
    encoder = TorchEncoder(
        model_dir, "embed", precision=args.precision, compile_model=not args.no_compile,
        use_graphs=not args.no_graphs,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(5):  # warm-up
        for ids, mask in batch_calls(rng, args.rows, *args.lengths):
            encoder.forward(ids, mask)
    host, device, tokens, calls = [], [], 0, 0
    for _ in range(args.batches):
        for ids, mask in batch_calls(rng, args.rows, *args.lengths):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            began = time.perf_counter()
            start.record()
            encoder.forward(ids, mask)
            end.record()
            torch.cuda.synchronize()
            host.append((time.perf_counter() - began) * 1e3)
            device.append(start.elapsed_time(end))
            tokens += int(mask.sum())
            calls += 1
    summary = {
        "shape": args.shape,
        "precision": encoder.precision,
        "compiled": not args.no_compile,
        "graphs": not args.no_graphs,
        "rows_per_batch": args.rows,
        "lengths": args.lengths,
        "calls_per_batch": calls / args.batches,
        "ms_per_call_host": round(float(np.mean(host)), 2),
        "ms_per_call_gpu_events": round(float(np.mean(device)), 2),
        "tokens_per_s": round(tokens / (sum(host) / 1e3)),
    }
    print(json.dumps(summary))
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as profiler:
        for ids, mask in batch_calls(rng, args.rows, *args.lengths):
            encoder.forward(ids, mask)
        torch.cuda.synchronize()
    tables = [
        profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
        profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=15),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    modes = ("" if args.no_compile else "-compiled") + ("" if args.no_graphs else "-graphs")
    tag = f"{args.shape}-{encoder.precision}-{args.rows}x{args.lengths[1]}{modes}"
    (args.out / f"profile-{tag}.txt").write_text(json.dumps(summary) + "\n\n" + "\n\n".join(tables))
    print(tables[1][:4000])


if __name__ == "__main__":
    main()
