"""What the benchmark scripts share: timing that waits for the GPU, perf_analyzer runs, Triton's per-model times,
percentiles, the device's own memory reading sampled through NVML, and the markdown tables for BENCHMARKS.md."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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


#: What a table shows instead of a number when perf_analyzer found no stable measurement (a noisy machine), even
#: after its retry with longer and more windows: the run goes on, and the row says so.
UNSTABLE = "unstable"
#: perf_analyzer 2.41's words (stderr, exit code 2) when its windows never agreed: "Failed to obtain stable
#: measurement within 4 measurement windows for concurrency 1. Please try to increase the --measurement-interval."
UNSTABLE_MESSAGE = "Failed to obtain stable measurement"
#: (window ms factor, max trials) of each attempt: as asked, then once with windows twice as long and twice as many.
PERF_ATTEMPTS = ((1, 4), (2, 8))


def read_perf_report(output: str, returncode: int, concurrency: int) -> dict[str, Any]:
    """perf_analyzer's numbers from its output (stdout and stderr together) and exit code: concurrency, infer/s, p50
    and p99 ms, `unstable` False. `unstable` True, with no numbers (None), where it said it could not obtain a stable
    measurement; RuntimeError for any other failure, or a report it cannot read."""
    if UNSTABLE_MESSAGE in output:
        return {"concurrency": concurrency, "infer_per_s": None, "p50_ms": None, "p99_ms": None, "unstable": True}
    if returncode != 0:
        raise RuntimeError(f"perf_analyzer failed (exit code {returncode}):\n{output}")
    client_block = output.split("Client:", 1)[-1]
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", client_block)
    p50, p99 = (re.search(rf"p{p} latency: (\d+) usec", client_block) for p in (50, 99))
    if "Client:" not in output or throughput is None or p50 is None or p99 is None:
        raise RuntimeError(f"could not read perf_analyzer's report:\n{output}")
    return {
        "concurrency": concurrency,
        "infer_per_s": float(throughput.group(1)),
        "p50_ms": int(p50.group(1)) / 1000,
        "p99_ms": int(p99.group(1)) / 1000,
        "unstable": False,
    }


def perf_analyzer(
    binary: str, url: str, model: str, data: Path, concurrency: int, log_file: Path, window_ms: int = 5000
) -> dict[str, Any]:
    """One perf_analyzer measurement over gRPC, one row per request from the steps of `data` (its --input-data
    JSON); numbers read from its report (read_perf_report), every attempt's output kept in `log_file`.

    A busy machine can keep its windows from agreeing: then it runs once more with windows twice as long and twice
    as many (PERF_ATTEMPTS), and if that is still unstable returns the row marked `unstable` (no numbers; tables show
    UNSTABLE) instead of ending the benchmark. Any other failure raises."""
    outputs = []
    report: dict[str, Any] = {}
    for factor, trials in PERF_ATTEMPTS:
        window = window_ms * factor
        command = [
            binary, "-m", model, "-u", url, "-i", "grpc", "-b", "1", "--input-data", str(data),
            "--concurrency-range", str(concurrency), "--measurement-interval", str(window),
            "--max-trials", str(trials), "--stability-percentage", "999",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600 * factor)
        output = result.stdout + result.stderr
        outputs.append(f"$ {' '.join(command)}\n{output}")
        log_file.write_text("\n".join(outputs))
        report = read_perf_report(output, result.returncode, concurrency)
        report["window_ms"] = window
        if not report["unstable"]:
            break
        print(f"perf_analyzer: no stable measurement of {model} at concurrency {concurrency} with {trials} windows "
              f"of {window} ms (see {log_file})", flush=True)  # fmt: skip
    return report


def measured(report: dict[str, Any], key: str, scale: float = 1.0, digits: int | None = 2) -> float | int | str:
    """A perf_analyzer number for a table or JSON row: report[key] * scale, rounded to `digits` (None: to an int);
    UNSTABLE where the measurement was unstable."""
    if report.get("unstable") or report.get(key) is None:
        return UNSTABLE
    value = float(report[key]) * scale
    return round(value) if digits is None else round(value, digits)


def find_perf_analyzer() -> str | None:
    """perf_analyzer on PATH, else the one `make test-tools` installs."""
    local = Path(__file__).resolve().parent.parent / ".cache" / "bin" / "perf_analyzer"
    return shutil.which("perf_analyzer") or (str(local) if local.exists() else None)


def time_per_model(client: Any, since: dict[str, Any] | None = None) -> dict[str, Any]:
    """Triton's own statistics since start (or since the `since` snapshot of get_inference_statistics): per model,
    executions, mean rows per execution, mean ms of compute per execution (queue time apart) - where the time of an
    end-to-end request goes. Triton adds an execution's whole duration to each request in it, so the duration of
    one execution is the compute total over the request count."""

    def counters(stats: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        def stat(model: dict[str, Any], name: str, field: str) -> int:  # JSON leaves zero counters out
            return int(model.get("inference_stats", {}).get(name, {}).get(field, 0))

        return {
            m["name"]: (
                int(m.get("execution_count", 0)),
                int(m.get("inference_count", 0)),
                stat(m, "compute_infer", "ns"),
                stat(m, "compute_infer", "count"),
                stat(m, "queue", "ns"),
                stat(m, "queue", "count"),
            )  # fmt: skip
            for m in stats["model_stats"]
        }

    now = counters(client.get_inference_statistics(as_json=True))
    then = counters(since) if since else {}
    times = {}
    for name, values in now.items():
        executions, inferences, compute_ns, computed, queue_ns, queued = (
            a - b for a, b in zip(values, then.get(name, (0,) * 6), strict=True)
        )
        if executions:
            times[name] = {
                "executions": executions,
                "rows_per_execution": round(inferences / executions, 1),
                "compute_ms": round(compute_ns / max(computed, 1) / 1e6, 2),
                "queue_ms_per_request": round(queue_ns / max(queued, 1) / 1e6, 2),
            }
    return times


def percentiles(values: Sequence[float], points: Sequence[int] = (50, 99)) -> dict[str, float | None]:
    """{"p50": ..., "p99": ...} of `values` (numpy's linear interpolation); None for each when there are none."""
    if not values:
        return {f"p{point}": None for point in points}
    return {f"p{point}": float(np.percentile(np.asarray(values, dtype=np.float64), point)) for point in points}


def process_label(pid: int) -> str:
    """What a GPU process is: a Triton python stub by its model (its command line names `<repo>/<model>/<version>/
    model.py`), else its program's name; the pid where /proc cannot say (another container's process)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    program = Path(args[0].decode(errors="replace")).name if args and args[0] else str(pid)
    if program == "triton_python_backend_stub" and len(args) > 1:
        return f"stub {Path(args[1].decode(errors='replace')).parent.parent.name}"
    if program.startswith("python") and len(args) > 1:
        return f"{program} {Path(args[1].decode(errors='replace')).name}"
    return program


class DeviceMemorySampler:
    """The GPU's own memory reading (NVML "used": every process on the device, the driver's share included, not only
    what torch allocated in this process), sampled every `interval` seconds on a background thread.

    Without NVML (a CPU machine, no driver) `available` is False and every peak is None, so a benchmark reports
    "n/a" there instead of failing. Which GPU: the first of CUDA_VISIBLE_DEVICES when it names indices, else GPU 0
    (as the router's probe picks it)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), used bytes)
        #: Per process (NVML's compute processes): (time.monotonic(), pid, used bytes); labels by pid, read when first
        #: seen (a stub's model name: it may have exited by the report).
        self.process_samples: list[tuple[float, int, int]] = []
        self.labels: dict[int, str] = {}
        self.name: str | None = None
        self.total: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
            self._nvml: Any = pynvml
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self.total = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        except Exception:  # no pynvml, no libnvidia-ml, no GPU
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def used(self) -> int | None:
        """One reading now (bytes), or None without NVML."""
        if self._nvml is None:
            return None
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def start(self) -> DeviceMemorySampler:
        if self._nvml is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            reading = self.used()
            moment = time.monotonic()
            processes = self._processes()
            if reading is not None:
                with self._lock:
                    self.samples.append((moment, reading))
                    self.process_samples += [(moment, pid, used) for pid, used in processes]
            self._stop.wait(self.interval)

    def _processes(self) -> list[tuple[int, int]]:
        """(pid, used bytes) of every compute process NVML attributes memory to; [] where it cannot (WSL2)."""
        try:
            found = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:  # an NVML without per-process accounting
            return []
        result = [(int(p.pid), int(p.usedGpuMemory)) for p in found if isinstance(p.usedGpuMemory, int)]
        for pid, _ in result:
            if pid not in self.labels:
                self.labels[pid] = process_label(pid)
        return result

    def process_peaks(self, since: float = float("-inf"), until: float = float("inf")) -> dict[str, int]:
        """The largest reading of each process between two instants, by label (a stub's model, `tritonserver`, the
        benchmark itself); processes with the same label (a model reloaded) keep the largest."""
        peaks: dict[str, int] = {}
        with self._lock:
            for moment, pid, used in self.process_samples:
                if since <= moment <= until:
                    label = self.labels.get(pid, str(pid))
                    peaks[label] = max(peaks.get(label, 0), used)
        return peaks

    def peak(self, since: float = float("-inf"), until: float = float("inf")) -> int | None:
        """The largest reading between two time.monotonic() instants (the whole run by default); None without NVML
        or without a sample in that span."""
        with self._lock:
            window = [used for moment, used in self.samples if since <= moment <= until]
        return max(window) if window else None
