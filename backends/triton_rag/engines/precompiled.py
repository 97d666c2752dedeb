"""A compiled function that a later load reads from disk instead of compiling again.

A cold load with a warm inductor cache still spends seconds in dynamo, which traces the decoder layer again in every
new process before the cache can answer (~5 s for an 8B layer on an H200, BENCHMARKS.md). torch's ahead-of-time
compile (`aot_compile`, `save_compiled_function`, `load_compiled_function`; experimental in torch 2.11-2.13) saves
the traced and compiled function itself; loading it skips tracing. Anything that goes wrong on that path falls back
to `torch.compile`, which is what ran before: the artifact only ever saves time.

The file's name is a digest of everything the compiled code depends on (the torch, CUDA and Triton versions, the
GPU, the model's config, precision, our engine sources: the layer is ours, `qwen3.py`), so a stale artifact is never
loaded; a file that fails to load anyway is compiled again and replaced.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

#: Where artifacts go when no directory is given: next to the inductor cache they depend on.
DIRECTORY_NAME = "triton-rag-precompiled"


def default_directory() -> Path:
    from torch._inductor.runtime.runtime_utils import cache_dir

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir()) / DIRECTORY_NAME


def artifact_key(parts: Sequence[str | bytes], sources: Sequence[Path]) -> str:
    """A digest of `parts` and the contents of `sources`, with what else compiled code depends on: the versions of
    Python, torch, CUDA and Triton, the GPU, inductor's settings in the environment, and this module.
    (torch also checks its own system facts when loading, and refuses a mismatch: a recompile, never a stale load.)"""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    digest = hashlib.sha256()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    inductor_env = sorted(
        f"{k}={v}" for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR_") and "DIR" not in k
    )
    facts = (platform.python_version(), torch.__version__, str(torch.version.cuda), triton_version)
    for part in (*facts, device, *inductor_env, *parts):
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    for source in (*sources, Path(__file__)):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:32]


#: What loading a saved compiled function imports, ~2 s of a cold load (H200 host, 2026-12-02).
COMPILER_MODULES = ("triton", "torch._dynamo", "torch._dynamo.aot_compile", "torch._inductor.compile_fx")
#: The interpreter's thread switch interval while they import: the checkpoint's reader threads hold the GIL for
#: moments and would otherwise wait up to the default 5 ms for it each time (at 0.5 ms the read still ran at half
#: speed, 6-8 GiB/s against 13-16 on the H200 host).
IMPORT_SWITCH_INTERVAL = 0.0001


def import_compiler_in_background() -> Callable[[], float]:
    """Start importing `COMPILER_MODULES` in a thread, so that their ~2 s overlap the checkpoint's read; the returned
    function waits for the imports and returns the seconds it waited. A module that fails to import is left for the
    real import to report."""
    import importlib
    import sys
    import threading

    interval = sys.getswitchinterval()

    def run() -> None:
        try:
            for name in COMPILER_MODULES:
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001  (reported by the import that needs it)
                    pass
        finally:
            sys.setswitchinterval(interval)

    sys.setswitchinterval(min(interval, IMPORT_SWITCH_INTERVAL))
    thread = threading.Thread(target=run, name="import-compiler", daemon=True)
    thread.start()

    def wait() -> float:
        started = time.perf_counter()
        thread.join()
        return time.perf_counter() - started

    return wait


class _GuardedFallback:
    """The precompiled function, and `fallback` (`torch.compile`) for the rare call outside its guards (a 1-token
    packed pass specialises differently): a precompiled function would raise there instead of compiling again. Its
    guards are checked here, once per call, so an error raised inside the model is never mistaken for a guard miss."""

    def __init__(self, precompiled: Any, fallback: Callable[..., Any]) -> None:
        self.precompiled = precompiled
        self.fallback = fallback
        self.fell_back = False  # whether any call went to `fallback`
        self._check: Callable[..., bool] | None = getattr(precompiled, "guard_check", None)
        if self._check is not None and hasattr(precompiled, "disable_guard_check"):
            precompiled.disable_guard_check()  # checked by us instead
        else:
            self._check = None

    def __call__(self, *args: Any) -> Any:
        if self._check is not None:
            if self._check(*args):
                return self.precompiled(*args)
        else:  # a torch without guard_check: its call raises on a guard miss, before running anything
            try:
                return self.precompiled(*args)
            except RuntimeError as error:
                if "GuardManager check failed" not in str(error):
                    raise
        self.fell_back = True
        return self.fallback(*args)


def _is_device_failure(error: BaseException) -> bool:
    """Out of memory or a CUDA error: the GPU's state, not the file's; it must surface, not trigger a recompile."""
    return isinstance(error, torch.OutOfMemoryError) or "CUDA error" in str(error)


def compile_once(
    function: Callable[..., Any],
    example: tuple[Any, ...],
    dynamic: Sequence[tuple[torch.Tensor, int]],
    file: Path | None,
    log: Callable[[str], None],
    started: float | None = None,
) -> Callable[..., Any]:
    """`function` compiled for every shape: loaded from `file` when a usable artifact is there, else compiled ahead of
    time from `example` (with the `dynamic` (tensor, dim) pairs left symbolic) and saved to `file`. With `file` None,
    or a torch without ahead-of-time compile, plain `torch.compile`. Call under the inference mode it will serve in.
    `function` must be a module-level function: a loaded artifact is bound to its module's globals. `started`: when
    the caller's part of this phase began (the times logged count from it)."""
    started = time.perf_counter() if started is None else started  # dynamo and inductor's imports (~2 s): counted
    jit = torch.compile(function, dynamic=True)
    if file is None or not hasattr(torch.compiler, "load_compiled_function"):
        return jit
    if file.exists():
        try:
            with file.open("rb") as handle:
                loaded = torch.compiler.load_compiled_function(handle, f_globals=function.__globals__)
            guarded = _GuardedFallback(loaded, jit)
            guarded(*example)  # fails now, at load, rather than on a request
            if guarded.fell_back:
                raise RuntimeError("its guards reject the example")
            log(f"compiled layer loaded from {file.name} in {time.perf_counter() - started:.1f} s")
            return guarded
        except Exception as error:  # a torch that changed underneath, a truncated file: compile again
            if _is_device_failure(error):
                raise
            log(f"precompiled layer {file.name} unusable ({type(error).__name__}: {error}); compiling it again")
    try:
        for tensor, dim in dynamic:
            torch._dynamo.mark_dynamic(tensor, dim)
        with torch._dynamo.config.patch(enable_aot_compile=True, specialize_float=True):
            compiled = torch.compile(function, fullgraph=True, dynamic=True).aot_compile((example, {}))
    except Exception as error:
        if _is_device_failure(error):
            raise
        log(f"ahead-of-time compilation failed ({type(error).__name__}: {error}); compiling on first use instead")
        return jit
    partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        compiled.save_compiled_function(str(partial))
        os.replace(partial, file)  # whole or absent: a concurrent load never reads half a file
        log(f"layer compiled ahead of time in {time.perf_counter() - started:.1f} s, saved as {file.name}")
    except Exception as error:  # a read-only or full cache: serve what was compiled, unsaved
        partial.unlink(missing_ok=True)
        log(f"layer compiled ahead of time in {time.perf_counter() - started:.1f} s, not saved ({error})")
    return _GuardedFallback(compiled, jit)
