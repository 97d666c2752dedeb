"""tools/bench_seed.py end to end on the CPU with the tiny models: a PDF through `docling_document`, chunks and
queries through `qwen_embed` and `qwen_rerank` on the real tritonserver, under a budget that fits one encoder, so
the swap counters, the lifted-cap steady state and the report's tables are all exercised (the benchmark is meant
for the GPU machine, where a broken tool costs a whole run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import CACHE_DIR, PROJECT_ROOT


@pytest.mark.server
def test_the_seed_benchmark_runs_end_to_end_and_reports_the_swaps(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, str(PROJECT_ROOT / "tools" / "bench_seed.py"), "--shape", "tiny",
        "--profile", str(PROJECT_ROOT / "rag.toml"), "--pages", "1", "--new-tokens", "8", "--converts", "1",
        "--queries", "2", "--warmup-queries", "0", "--steady-queries", "2", "--concurrency", "2",
        "--accuracy-pairs", "16", "--no-fp8-run",
        # each tiny model fits the budget alone (prepare checks its ~0.6 GiB estimate); two encoders' stubs (~0.3 GiB of
        # RAM each) are above its high watermark, so the idle one is evicted and each query swaps
        "--set", "router.budget=640MiB", "--set", "router.high_watermark=0.5",
        "--set", "router.min_residency_seconds=0",
        "--work", str(tmp_path / "work"), "--cache-dir", str(CACHE_DIR), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "seed.json").read_text())
    (config,) = report["configurations"]
    assert config["convert"]["pages"] == 1 and not config["convert"]["page_errors"]
    assert config["embed_chunks"]["chunks"] == len(config["embed_chunks"]["request_s"]) >= 2
    assert len(config["query_loop"]) == 2
    assert config["stage_swaps"]["query_loop"]["loads"] >= 2  # each query loaded the encoder it needed
    assert len(config["steady_loop"]) == 2
    assert not any(any(row["swaps"].values()) for row in config["steady_loop"])  # the cap lifted: no swap
    assert config["peak_device_bytes"]["whole"] is None  # no NVML on a CPU machine: "n/a", not a failure
    accuracy = report["accuracy"]
    assert 0 < accuracy["rerank"]["pairs"] <= 16 and accuracy["rerank"]["spearman"] == pytest.approx(1.0)
    assert accuracy["embed"]["cosine_min"] == pytest.approx(1.0, abs=1e-6)  # float32 both sides on a CPU
    table = (out / "seed.md").read_text()
    assert "| profile |" in table and "(cap lifted)" in table and "n/a" in table
