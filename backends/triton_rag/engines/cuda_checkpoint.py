"""A sleeping engine's last device memory off the GPU: its CUDA context, the kernels and cuBLAS handles loaded into
it, the allocator's and CUDA graphs' leftovers (~0.8 GiB for an 8B encoder on an H200 after the weights went to the
host and the stack reserve was trimmed; BENCHMARKS.md). Only the process's end frees a context, except for one thing:
the driver's checkpoint API (`cuCheckpointProcessLock` / `Checkpoint` / `Restore` / `Unlock`, Linux drivers 550+),
which copies a process's GPU state into its host memory and releases the GPU's references, and restores them later
on the same GPU. Measured on the H200 (tools/probe_cuda_checkpoint.py): a checkpointed process holds nothing on the
device; its tensors, CUDA graphs, pinned host buffers and cuBLAS work again after the restore.

The API is for an outside controller (a locked process cannot make CUDA calls), so `ContextRelease` runs this file
as a short helper process (standard library only, no context of its own) and waits for it. Where the driver lacks
the API or refuses (an older driver, WSL2, a process state it cannot save), the context stays and the reason is
logged once: the release only ever saves memory.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

_log = logging.getLogger(__name__)

#: CUprocessState values (cuda.h).
RUNNING, LOCKED, CHECKPOINTED, FAILED = 0, 1, 2, 3
#: How long the lock may wait for the process's CUDA calls in flight, and the helper for its whole operation.
LOCK_TIMEOUT_MS = 10_000
HELPER_TIMEOUT_S = 120.0


class _LockArgs(ctypes.Structure):  # CUcheckpointLockArgs
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


def _python() -> str:
    """The interpreter for the helper: this one, unless it is embedded (a Triton stub's sys.executable may be the
    stub binary), then python3 on the PATH."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or sys.executable


class ContextRelease:
    """Checkpoints this process's GPU state (`release`) and restores it (`restore`) through the helper. `released`
    says which of the two the process is in; after a refusal, `unavailable` holds the reason and `release` is a
    no-op."""

    def __init__(self, log: Callable[[str], None] = _log.info) -> None:
        self.log = log
        self.released = False
        self.unavailable: str | None = None

    def release(self) -> bool:
        """Checkpoint this process (every CUDA stream must be idle: the caller synchronizes first). True when its
        GPU memory is now all on the host."""
        if self.released or self.unavailable is not None:
            return self.released
        ok, detail = run_helper("checkpoint")
        if ok:
            self.released = True
            self.log(f"CUDA context checkpointed to host memory in {detail}: this process holds no GPU memory")
        else:
            self.unavailable = detail
            self.log(f"the CUDA context stays on the GPU while asleep: {detail}")
        return self.released

    def restore(self) -> float:
        """Bring the GPU state back (before any CUDA call). Seconds it took; RuntimeError if the driver refuses
        (the process cannot use the GPU then: its model must be reloaded)."""
        if not self.released:
            return 0.0
        started = time.perf_counter()
        ok, detail = run_helper("restore")
        if not ok:
            raise RuntimeError(f"could not restore the CUDA context from its checkpoint: {detail}")
        self.released = False
        return time.perf_counter() - started


def run_helper(action: str, pid: int | None = None) -> tuple[bool, str]:
    """Run this file as the controller of `pid` (default: this process): (succeeded, what it said)."""
    command = [_python(), "-I", str(Path(__file__)), action, str(pid or os.getpid())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=HELPER_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"the checkpoint helper did not finish ({error})"
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return False, f"the checkpoint helper failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"
    return bool(answer.get("ok")), str(answer.get("detail", ""))


# --- the helper: runs as its own process, the standard library only ------------------------------------------------


def _driver() -> tuple[ctypes.CDLL | None, str]:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        return None, f"no CUDA driver ({error})"
    if cuda.cuInit(0) != 0:
        return None, "the CUDA driver did not initialise"
    if not hasattr(cuda, "cuCheckpointProcessLock"):
        return None, "this CUDA driver has no checkpoint API (Linux drivers 550+)"
    return cuda, ""


def _error(cuda: ctypes.CDLL, result: int) -> str:
    text = ctypes.c_char_p()
    cuda.cuGetErrorString(result, ctypes.byref(text))
    return f"{(text.value or b'').decode()} (CUresult {result})"


def _state(cuda: ctypes.CDLL, pid: int) -> int:
    state = ctypes.c_int(-1)
    cuda.cuCheckpointProcessGetState(pid, ctypes.byref(state))
    return state.value


def control(action: str, pid: int) -> tuple[bool, str]:
    """checkpoint: lock `pid` and copy its GPU state to its host memory (unlocked again if the copy fails);
    restore: the reverse, from whichever state it is in."""
    cuda, problem = _driver()
    if cuda is None:
        return False, problem
    started = time.perf_counter()
    if action == "checkpoint":
        args = _LockArgs(timeoutMs=LOCK_TIMEOUT_MS)
        if (result := cuda.cuCheckpointProcessLock(pid, ctypes.byref(args))) != 0:
            return False, f"the driver could not lock the process: {_error(cuda, result)}"
        if (result := cuda.cuCheckpointProcessCheckpoint(pid, None)) != 0:
            cuda.cuCheckpointProcessUnlock(pid, None)
            return False, f"the driver refused the checkpoint: {_error(cuda, result)}"
        return True, f"{time.perf_counter() - started:.3f} s"
    if _state(cuda, pid) == CHECKPOINTED and (result := cuda.cuCheckpointProcessRestore(pid, None)) != 0:
        return False, f"the driver refused the restore: {_error(cuda, result)}"
    if _state(cuda, pid) == LOCKED and (result := cuda.cuCheckpointProcessUnlock(pid, None)) != 0:
        return False, f"the driver could not unlock the process: {_error(cuda, result)}"
    return True, f"{time.perf_counter() - started:.3f} s"


if __name__ == "__main__":
    ok, detail = control(sys.argv[1], int(sys.argv[2]))
    print(json.dumps({"ok": ok, "detail": detail}))
