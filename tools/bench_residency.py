"""The host-RAM tier at the engine level (no Triton): what sleep and wake cost an encoder of a real Qwen3 size, against
the cold load it replaces, measured in the same run.

For each precision: one cold load of a random-weight encoder (each step timed: read, to the device, FP8 quantization,
weight arena, compile and CUDA-graph capture), steady-state latency (one 12-token query; 32 rows of 256 tokens, a
rerank of 32 documents), then sleep/wake cycles: sleep and wake seconds, the first request after a wake against the
steady state, and the device's free memory across `--cycles` cycles (drift), with the outputs checked equal after.

    python tools/bench_residency.py --shape 8b --precisions fp8 bfloat16 --cycles 1000 --out bench_results/residency
Writes `residency.json` and `residency.md` (a table for BENCHMARKS.md) under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import torch

from triton_rag.build.offline import QWEN3_SHAPES, TINY_QWEN3, build_random_qwen3
from triton_rag.engines.torch_encoder import TorchEncoder

SHAPES = QWEN3_SHAPES | {"tiny": TINY_QWEN3}
QUERY = (np.full((1, 12), 1000, dtype=np.int64), np.ones((1, 12), dtype=np.int64))
RERANK_BATCH = (
    np.random.default_rng(0).integers(100, 100000, size=(32, 256)).astype(np.int64),
    np.ones((32, 256), dtype=np.int64),
)


def log(message: str) -> None:
    print(f"[bench_residency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    return statistics.median(benchlib.timed(fn, device)[1] for _ in range(repeats))


def device_free() -> int:
    if not torch.cuda.is_available():  # a smoke run on a CPU machine (tiny shape): no device memory to read
        return 0
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def cold_load(model_dir: Path, precision: str) -> tuple[TorchEncoder, float, list[tuple[float, str]]]:
    """The load a full unload makes the next request pay (in this process: imports and the inductor cache warm)."""
    steps: list[tuple[float, str]] = []
    started = time.perf_counter()

    def stamp(message: str) -> None:
        steps.append((round(time.perf_counter() - started, 3), message))
        log(f"  +{steps[-1][0]:.2f} s {message}")

    encoder = TorchEncoder(
        model_dir, "embed", precision=precision, compile_model=True, max_batch_tokens=8192, sleepable=True, log=stamp
    )
    benchlib.timed(lambda: None, encoder.device)
    return encoder, time.perf_counter() - started, steps


def bench_precision(model_dir: Path, precision: str, cycles: int, wakes: int) -> dict[str, Any]:
    free_before = device_free()
    encoder, load_s, steps = cold_load(model_dir, precision)
    assert encoder.arena is not None
    device = encoder.device
    weight_bytes = encoder.arena.nbytes
    expected_query, expected_batch = encoder.forward(*QUERY), encoder.forward(*RERANK_BATCH)
    steady_query = median_seconds(lambda: encoder.forward(*QUERY), device, 30)
    steady_batch = median_seconds(lambda: encoder.forward(*RERANK_BATCH), device, 10)
    log(
        f"{precision}: cold load {load_s:.2f} s; steady query {steady_query * 1e3:.2f} ms, "
        f"32x256 {steady_batch * 1e3:.1f} ms"
    )

    first_sleep = benchlib.timed(encoder.sleep, device)[1]  # includes making the pinned host copy (once per load)
    sleeps, wake_seconds, first_query, first_batch = [], [], [], []
    for index in range(wakes):
        wake_seconds.append(benchlib.timed(encoder.wake, device)[1])
        # alternate which request comes first after a wake: both are what a swapped-in model serves
        if index % 2 == 0:
            first_query.append(benchlib.timed(lambda: encoder.forward(*QUERY), device)[1])
        else:
            first_batch.append(benchlib.timed(lambda: encoder.forward(*RERANK_BATCH), device)[1])
        sleeps.append(benchlib.timed(encoder.sleep, device)[1])
    encoder.wake()
    np.testing.assert_array_equal(encoder.forward(*QUERY), expected_query)
    np.testing.assert_array_equal(encoder.forward(*RERANK_BATCH), expected_batch)
    log(f"{precision}: wake median {statistics.median(wake_seconds):.3f} s, sleep {statistics.median(sleeps):.4f} s")

    encoder.sleep()
    asleep_free = device_free()
    encoder.wake()
    cycle_start_free = device_free()
    started = time.perf_counter()
    for _ in range(cycles):
        encoder.sleep()
        encoder.wake()
        encoder.forward(*QUERY)
    cycles_s = time.perf_counter() - started
    drift = device_free() - cycle_start_free
    np.testing.assert_array_equal(encoder.forward(*QUERY), expected_query)
    np.testing.assert_array_equal(encoder.forward(*RERANK_BATCH), expected_batch)
    log(f"{precision}: {cycles} cycles in {cycles_s:.1f} s, free memory drift {drift / 2**20:+.1f} MiB")
    result = {
        "precision": precision,
        "weight_bytes": weight_bytes,
        "cold_load_s": load_s,
        "cold_load_steps": steps,
        "device_bytes_awake": free_before - cycle_start_free,
        "device_bytes_asleep": free_before - asleep_free,
        "steady_query_s": steady_query,
        "steady_batch_s": steady_batch,
        "first_sleep_s": first_sleep,
        "sleep_s": sleeps,
        "wake_s": wake_seconds,
        "first_query_after_wake_s": first_query,
        "first_batch_after_wake_s": first_batch,
        "cycles": cycles,
        "cycles_s": cycles_s,
        "free_drift_bytes": drift,
    }
    return result  # the engine goes with this frame; the caller empties the CUDA cache


def markdown(report: dict[str, Any]) -> str:
    med = statistics.median
    lines = [
        f"### Host-RAM tier, engine level ({report['date']}, {report['device']}, {report['shape']} shape)",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    rows = []
    for r in report["results"]:
        rows.append(
            [
                r["precision"],
                f"{r['weight_bytes'] / 2**30:.2f} GiB",
                f"{r['cold_load_s']:.2f}",
                f"{med(r['wake_s']):.3f} (max {max(r['wake_s']):.3f})",
                f"{med(r['sleep_s']) * 1e3:.1f} (first {r['first_sleep_s']:.2f} s)",
                f"{r['steady_query_s'] * 1e3:.2f} / {med(r['first_query_after_wake_s']) * 1e3:.2f}",
                f"{r['steady_batch_s'] * 1e3:.1f} / {med(r['first_batch_after_wake_s']) * 1e3:.1f}",
                f"{(r['device_bytes_awake'] - r['device_bytes_asleep']) / 2**30:.2f} GiB",
                f"{r['cycles']}: {r['free_drift_bytes'] / 2**20:+.1f} MiB",
            ]
        )
    lines += benchlib.markdown_table(
        [
            "precision",
            "weights",
            "cold load s (baseline)",
            "wake s",
            "sleep ms",
            "query ms steady / first after wake",
            "32x256 ms steady / first after wake",
            "freed by sleep",
            "cycles: free-memory drift",
        ],
        rows,
    )
    for r in report["results"]:
        steps = "; ".join(f"+{t:.2f} s {m}" for t, m in r["cold_load_steps"])
        lines += ["", f"Cold load steps, {r['precision']}: {steps}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["fp8", "bfloat16"])
    parser.add_argument("--cycles", type=int, default=1000, help="sleep/wake/query cycles for the drift figure")
    parser.add_argument("--wakes", type=int, default=20, help="timed wakes (each followed by a first request)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/triton-rag-bench"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, default=Path("bench_results/residency"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = build_random_qwen3(
        "embed", args.work / f"qwen3-{args.shape}-embed", args.cache_dir, SHAPES[args.shape], log,
        *(("bfloat16", "cuda") if cuda else ("float32", "cpu")),
    )
    log(f"random {args.shape} weights ready in {time.perf_counter() - started:.1f} s")
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "shape": args.shape,
        "command": "python tools/bench_residency.py " + " ".join(sys.argv[1:]),
        "results": [],
    }
    for precision in args.precisions:
        cycles = args.cycles if precision == args.precisions[0] else min(args.cycles, 50)
        report["results"].append(bench_precision(model_dir, precision, cycles, args.wakes))
        if torch.cuda.is_available():  # the last engine's memory, freed with bench_precision's frame
            torch.cuda.empty_cache()
        (args.out / "residency.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "residency.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
