"""What the benchmark scripts share: timing that waits for the GPU, and the markdown tables for BENCHMARKS.md."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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
