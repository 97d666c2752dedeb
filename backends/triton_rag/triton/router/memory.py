"""How much memory a compute model holds, measured from outside it, and where its python stub processes are.

Triton runs each python model instance in its own stub process, so what a model holds is what its stubs hold:
- GPU (NVML): the GPU memory NVML reports for the model's stub processes. Where NVML cannot attribute memory to
  those processes (WSL2, some containers, models that run inside tritonserver itself such as TensorRT plans), the
  router falls back to the change in the device's used memory across the load (loads run one at a time).
- CPU: the resident set size (VmRSS) of the model's stub processes, which includes the stub's Python and torch
  runtime (a few hundred MiB), not only the weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from triton_rag.contract.params import RouterSettings
from triton_rag.core.measurements import ram_total
from triton_rag.core.units import format_bytes

STUB_NAME = "triton_python_backend_stub"


def stub_pids(model: str, server_pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Stub processes of `model` started by the tritonserver `server_pid` (other servers on the machine excluded).

    A stub's command line is `<stub> <repository>/<model>/<version>/model.py <shm region> ...`."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent != server_pid or len(args) < 2 or not args[0].endswith(STUB_NAME.encode()):
            continue
        if Path(args[1].decode(errors="replace")).parent.parent.name == model:
            pids.append(int(entry.name))
    return sorted(pids)


def dead_stubs(server_pid: int, proc: Path = Path("/proc")) -> set[int]:
    """Stub processes of the tritonserver `server_pid` that have exited and that it has not reaped (zombies).

    A zombie keeps its short name (`comm`, 15 characters) but loses its command line, so which model it served is
    unknown; `_load` compares this set before and during a load. tritonserver reaps a stub only when it gives up on
    it, so a stub that died before its first message (tritonserver 2.51 waits for that one forever) stays here."""
    dead = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        state, parent = rest.split()[:2]
        if state == "Z" and int(parent) == server_pid and STUB_NAME.startswith(name):
            dead.add(int(entry.name))
    return dead


def alive(pids: Iterable[int]) -> list[int]:
    result = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            result.append(pid)
    return result


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class MemoryProbe(Protocol):
    #: "gpu" or "cpu": what the budget is a budget of.
    device: str
    #: Total memory of the device (GPU memory, or RAM).
    total: int
    description: str

    def process_bytes(self, pids: list[int]) -> int | None:
        """Memory held by these processes, or None when it cannot be attributed to processes."""

    def device_used(self) -> int:
        """Memory in use on the whole device."""


@dataclass
class CpuProbe:
    device: str = "cpu"
    total: int = 0
    description: str = "RAM: resident set size of each model's stub processes (/proc)"

    def __post_init__(self) -> None:
        self.total = ram_total()

    def process_bytes(self, pids: list[int]) -> int | None:
        return rss_bytes(pids)

    def device_used(self) -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return self.total - int(line.split()[1]) * 1024
        return 0


class GpuProbe:
    """One GPU through NVML: the first of CUDA_VISIBLE_DEVICES when it names indices, else GPU 0."""

    device = "gpu"

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml: Any = pynvml
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        index = int(visible) if visible.isdigit() else 0
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.total = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        name = pynvml.nvmlDeviceGetName(self._handle)
        self.description = f"GPU {index} ({name}): NVML memory of each model's stub processes"

    def process_bytes(self, pids: list[int]) -> int | None:
        nvml = self._nvml
        wanted = set(pids)
        found = False
        total = 0
        for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                processes = query(self._handle)
            except nvml.NVMLError:
                continue
            for process in processes:
                if process.pid in wanted and isinstance(process.usedGpuMemory, int):
                    found = True
                    total += process.usedGpuMemory
        return total if found else None

    def device_used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


@dataclass(frozen=True)
class DeviceMemory:
    """The memory the router's budget is a share of: the probe's device, capped at [router] device_memory on a GPU."""

    total: int
    #: STATUS `memory`: what is measured, and the cap where there is one.
    description: str
    #: A line for the log where the cap applies or is ignored; empty without a cap.
    note: str


def device_memory(probe: MemoryProbe, settings: RouterSettings) -> DeviceMemory:
    """The probe's total, capped where `device_memory` applies (a GPU); on the CPU the cap is ignored, with a note."""
    cap = settings.device_memory_cap()
    total = settings.device_total(probe.device, probe.total)
    if not cap:
        return DeviceMemory(total, probe.description, "")
    if probe.device != "gpu":
        note = (
            f"device_memory {settings.device_memory} ignored: it caps a GPU's memory, and this router's budget is "
            f"of the RAM ({format_bytes(probe.total)})"
        )
        return DeviceMemory(total, probe.description, note)
    capped = f"{format_bytes(total)} of the GPU's {format_bytes(probe.total)} (device_memory {settings.device_memory})"
    return DeviceMemory(total, f"{probe.description}; {capped}", f"device memory: {capped}")


def open_probe() -> MemoryProbe:
    """NVML when a GPU and its driver library are present, else RAM."""
    try:
        return GpuProbe()
    except Exception:  # no libnvidia-ml, no GPU, no driver: a CPU deployment
        return CpuProbe()
