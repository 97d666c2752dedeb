"""The CUDA context's own memory, trimmed: the per-thread stack the driver reserves for every thread the GPU can hold.

A CUDA context reserves local memory for the per-thread stack of every thread that can be resident at once (SMs x
threads per SM x the stack limit, 1 KiB by default): on an H200 (132 SMs x 2048 threads) that is 264 MiB of the
520 MiB a bare context took, in every process that uses the GPU (each Triton stub). Measured there (2026-12-03,
BENCHMARKS.md): a stack limit of 256 bytes took the context from 520 to 322 MiB.

Lowering the limit is safe: the driver raises it again for any kernel that needs more, at its launch ("The driver
automatically increases the per-thread stack size for each kernel launch as needed", CUDA driver API,
cuCtxSetLimit), and keeps the larger value. So the trim is re-applied when an engine goes to sleep, which is when
the memory matters most (a sleeping engine's residue).
"""

from __future__ import annotations

import ctypes
import logging

import torch

_log = logging.getLogger(__name__)

#: CU_LIMIT_STACK_SIZE in the driver API's CUlimit.
_STACK_SIZE = 0
#: Bytes per thread after the trim; kernels that need more get more (the driver raises the limit at their launch).
TRIMMED_STACK_BYTES = 256


def trim_stack_reserve(device: torch.device, stack_bytes: int = TRIMMED_STACK_BYTES) -> bool:
    """Lower the current context's per-thread stack limit to `stack_bytes` (the driver frees the local memory it
    reserved above it). True when done; False on a CPU or where the driver refuses (logged, harmless: only memory)."""
    if device.type != "cuda":
        return False
    torch.cuda.synchronize(device)  # the driver waits for pending work anyway; no kernel of ours is mid-flight
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    with torch.cuda.device(device):  # makes the device's primary context (torch's) current on this thread
        result = driver.cuCtxSetLimit(_STACK_SIZE, ctypes.c_size_t(stack_bytes))
    if result != 0:
        _log.warning(f"could not lower the CUDA stack limit to {stack_bytes} bytes (CUresult {result}); harmless")
        return False
    return True


def allocator_summary(device: torch.device) -> str:
    """What torch's caching allocator holds on `device` (activations, CUDA-graph pools, workspaces; the weight arena
    is outside it): for a load's log, so a model's measured footprint can be split into its parts."""
    stats = torch.cuda.memory_stats(device)
    mib = 1 << 20
    return (
        f"torch's allocator holds {stats.get('reserved_bytes.all.current', 0) / mib:.0f} MiB "
        f"({stats.get('allocated_bytes.all.current', 0) / mib:.0f} MiB in use, "
        f"{stats.get('allocated_bytes.all.peak', 0) / mib:.0f} MiB at the peak)"
    )
