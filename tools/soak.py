"""Soak test: mixed load for a long time on the real tritonserver, under a router budget that fits one encoder (so
the embedder and the reranker swap all the time), with every process's memory sampled: does anything grow?

Clients (--clients threads) loop over a query embedding, a single-pair rerank and a 32-document rerank. Every
--interval seconds each process of the server is read from /proc (RSS; tritonserver and each model's stubs, summed
by model since a swap starts new stub processes) and, on a GPU, the device's own reading (NVML). The drift is the
least-squares slope of each series over the run's second half (the first is warm-up: caches, first loads),
in MiB per hour. Tiny random models on a CPU, real Qwen3 shapes on a GPU (--shape).

    python tools/soak.py --minutes 10 --out bench_results/soak
Writes soak.json and soak.md (a table for BENCHMARKS.md) under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import bench_router
import benchlib
import numpy as np
import tritonclient.grpc as grpcclient

from triton_rag.build.settings import RouterSettings
from triton_rag.client import RouterControl
from triton_rag.core.ledger import COUNTERS
from triton_rag.triton.router.memory import rss_bytes


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def drift_per_hour(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, bytes) samples over their second half, in MiB per hour (None: < 4 there)."""
    if not samples:
        return None
    start = samples[0][0] + (samples[-1][0] - samples[0][0]) / 2
    late = [(t, v) for t, v in samples if t >= start]
    if len(late) < 4:
        return None
    times, values = np.array([t for t, _ in late]), np.array([v for _, v in late])
    slope = float(np.polyfit(times - times[0], values, 1)[0])  # bytes per second
    return slope * 3600 / 2**20


def same_processes(pid_sets: list[tuple[float, frozenset[int]]]) -> bool:
    """Whether the same processes were sampled all through the second half (a drift of a series whose processes a
    swap replaced measures the swaps, not a leak)."""
    if not pid_sets:
        return False
    start = pid_sets[0][0] + (pid_sets[-1][0] - pid_sets[0][0]) / 2
    return len({pids for t, pids in pid_sets if t >= start}) == 1


def server_processes(server_pid: int) -> dict[str, list[int]]:
    """tritonserver and its children (the stubs), grouped by label (`benchlib.process_label`)."""
    groups: dict[str, list[int]] = {"tritonserver": [server_pid]}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == server_pid:
            groups.setdefault(benchlib.process_label(int(entry.name)), []).append(int(entry.name))
    return groups


def client_loop(url: str, stop: threading.Event, counts: dict[str, int], lock: threading.Lock) -> None:
    client = grpcclient.InferenceServerClient(url)
    calls = (
        ("embed", bench_router.embed_once),
        ("rerank", bench_router.rerank_once),
        ("rerank 32", bench_router.rerank_documents),
    )
    while not stop.is_set():
        for name, call in calls:
            try:
                call(client)
                key = name
            except Exception as exc:  # counted and shown, never fatal: a soak reports its errors
                key = f"error: {type(exc).__name__}: {str(exc)[:120]}"
            with lock:
                counts[key] = counts.get(key, 0) + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--shape", default="tiny", choices=sorted(bench_router.SHAPES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/triton-rag-soak"))
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent.parent / ".cache")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    repository, _ = bench_router.prepare(args.work, args.cache_dir, args.shape, RouterSettings(), name="soak")
    server = bench_router.start(repository, args.cache_dir, args.out, "soak-server")
    assert server.process is not None
    router = RouterControl(server.grpc_url, key=server.admin_key)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    bench_router.embed_once(client)
    bench_router.rerank_once(client)
    sizes = [row["measured_bytes"] or row["estimate_bytes"] for row in router.status()["models"].values()]
    budget = max(sizes) + min(sizes) // 2  # either encoder fits, both do not: every switch swaps
    router.set_budget(str(budget))
    log(f"budget {budget / 2**20:.0f} MiB: the encoders swap; {args.clients} clients for {args.minutes:g} min")
    gpu = benchlib.DeviceMemorySampler(interval=args.interval)
    gpu.start()
    stop, lock, counts = threading.Event(), threading.Lock(), {}
    threads = [
        threading.Thread(target=client_loop, args=(server.grpc_url, stop, counts, lock), daemon=True)
        for _ in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    series: dict[str, list[tuple[float, float]]] = {}
    pid_sets: dict[str, list[tuple[float, frozenset[int]]]] = {}  # a swap restarts an encoder's stub: a new pid
    started = time.monotonic()
    try:
        while time.monotonic() - started < args.minutes * 60:
            now = time.monotonic() - started
            for label, pids in server_processes(server.process.pid).items():
                series.setdefault(label, []).append((now, float(rss_bytes(pids))))
                pid_sets.setdefault(label, []).append((now, frozenset(pids)))
            time.sleep(args.interval)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        gpu.stop()
        status = router.status()
        server.stop()
    swaps = {name: {k: row[k] for k in COUNTERS} for name, row in status["models"].items()}
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "shape": args.shape,
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": counts,
        "swaps": swaps,
        "rss": {
            label: {
                "first_mib": values[0][1] / 2**20,
                "last_mib": values[-1][1] / 2**20,
                "max_mib": max(v for _, v in values) / 2**20,
                "drift_mib_per_hour": drift_per_hour(values) if same_processes(pid_sets[label]) else None,
                "processes_seen": len(set().union(*(pids for _, pids in pid_sets[label]))),
            }
            for label, values in series.items()
        },
        "gpu_drift_mib_per_hour": drift_per_hour([(t, float(v)) for t, v in gpu.samples]) if gpu.samples else None,
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    lines = [f"Soak ({report['date']}, shape {args.shape}, {args.clients} clients, {args.minutes:g} min): requests "
             + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ""]  # fmt: skip
    lines += benchlib.markdown_table(
        ["process", "processes seen", "RSS first MiB", "last MiB", "max MiB", "drift MiB/h (second half)"],
        [
            [label, r["processes_seen"], f"{r['first_mib']:.0f}", f"{r['last_mib']:.0f}", f"{r['max_mib']:.0f}",
             "- (restarted by swaps)" if r["drift_mib_per_hour"] is None else f"{r['drift_mib_per_hour']:+.1f}"]
            for label, r in report["rss"].items()
        ],
    )  # fmt: skip
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
