"""Can the CUDA driver's checkpoint API take a sleeping encoder's last GPU memory (its context, loaded kernels, cuBLAS
workspaces) off the device, and give it back? A child process does what a sleeping stub has done (torch, a matmul, a
CUDA graph, a pinned host buffer); this process, the controller, locks and checkpoints it by pid
(cuCheckpointProcessLock / Checkpoint, driver 550+), reads the child's device memory (NVML), restores and unlocks
it, and the child checks that its tensors, its graph and a new matmul still work. Times each step.

    python3 tools/probe_cuda_checkpoint.py --out $OUT/checkpoint.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

_log = logging.getLogger("probe_cuda_checkpoint")

CHILD = r"""
import sys, torch
x = torch.randn(4096, 4096, device="cuda")
y = x @ x
keep = torch.randn(256, 1024, 1024, device="cuda")  # 1 GiB the checkpoint must carry
checksum = float(keep.sum())
pinned = torch.ones(64, 1024, 1024, pin_memory=True)  # 256 MiB of pinned host memory (the sleeping weights)
static = torch.zeros(1024, device="cuda")
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    static.add_(1)
graph.replay()
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()  # the controller checkpoints and restores meanwhile
graph.replay()
z = x @ x
back = pinned.to("cuda", non_blocking=True)
torch.cuda.synchronize()
ok = abs(float(keep.sum()) - checksum) < 1e-3 and float(static[0]) == 2.0 and torch.allclose(z, y)
ok = ok and float(back.sum()) == 64 * 1024 * 1024
print("ok" if ok else "wrong", flush=True)
"""


def process_memory_mib(pid: int) -> float | None:
    """This pid's device memory in MiB as NVML reports it, None when the process holds none."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if process.pid == pid:
            return (process.usedGpuMemory or 0) / 2**20
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cuda = ctypes.CDLL("libcuda.so.1")
    report: dict[str, object] = {"init": cuda.cuInit(0)}
    version = ctypes.c_int()
    cuda.cuDriverGetVersion(ctypes.byref(version))
    report["driver_api"] = version.value
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    report["child"] = child.stdout.readline().strip()
    report["before_mib"] = process_memory_mib(child.pid)
    steps = (
        ("lock", "cuCheckpointProcessLock"),
        ("checkpoint", "cuCheckpointProcessCheckpoint"),
        ("restore", "cuCheckpointProcessRestore"),
        ("unlock", "cuCheckpointProcessUnlock"),
    )
    for step, function in steps:
        started = time.perf_counter()
        try:
            result = getattr(cuda, function)(child.pid, None)
        except AttributeError as error:
            report[step] = f"missing: {error}"
            break
        report[f"{step}_result"] = result
        report[f"{step}_s"] = round(time.perf_counter() - started, 4)
        report[f"after_{step}_mib"] = process_memory_mib(child.pid)
        _log.info("%s: %s", step, json.dumps({k: v for k, v in report.items() if k.startswith(step) or step in k}))
        if result != 0:
            break
    child.stdin.write("go\n")
    child.stdin.flush()
    report["child_after"] = child.stdout.readline().strip()
    child.wait(timeout=60)
    _log.info(json.dumps(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
