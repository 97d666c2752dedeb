"""What the benchmark scripts share: timing that waits for the GPU, perf_analyzer runs, and the markdown tables for
BENCHMARKS.md."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn's result, seconds), with the device's queued work finished on both sides of the measurement."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Lines of a markdown table; None cells print as "-"."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |")
    return lines


def perf_analyzer(
    binary: str, url: str, model: str, data: Path, concurrency: int, log_file: Path, window_ms: int = 5000
) -> dict[str, float]:
    """One perf_analyzer measurement over gRPC, one row per request from the steps of `data` (its --input-data
    JSON); numbers read from its report on stdout, which is kept in `log_file`."""
    command = [
        binary, "-m", model, "-u", url, "-i", "grpc", "-b", "1", "--input-data", str(data),
        "--concurrency-range", str(concurrency), "--measurement-interval", str(window_ms),
        "--max-trials", "4", "--stability-percentage", "999",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    log_file.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed:\n{result.stdout}\n{result.stderr}")
    client_block = result.stdout.split("Client:", 1)[-1]
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", client_block)
    p50, p99 = (re.search(rf"p{p} latency: (\d+) usec", client_block) for p in (50, 99))
    if throughput is None or p50 is None or p99 is None:
        raise RuntimeError(f"could not read perf_analyzer's report:\n{result.stdout}")
    return {
        "concurrency": concurrency,
        "infer_per_s": float(throughput.group(1)),
        "p50_ms": int(p50.group(1)) / 1000,
        "p99_ms": int(p99.group(1)) / 1000,
    }


def find_perf_analyzer() -> str | None:
    """perf_analyzer on PATH, else the one `make test-tools` installs."""
    local = Path(__file__).resolve().parent.parent / ".cache" / "bin" / "perf_analyzer"
    return shutil.which("perf_analyzer") or (str(local) if local.exists() else None)
