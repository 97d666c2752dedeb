"""A compiled function that a later load reads from disk instead of compiling again.

The first load traces the function once (`torch.export`) and compiles it with AOTInductor into a package (`.pt2`: a
shared library with the host code and the GPU kernels). Later loads open the package with torch's C++ loader: no
tracing, and none of the compiler's Python (dynamo, inductor, Triton, sympy), whose imports alone cost a cold load
~2.4 s of the GIL on the H200 host even with byte code cached (BENCHMARKS.md, issue 13). The function's module (a
decoder layer) is not compiled in: its parameters and buffers are inputs of the package, so one package serves every
layer, and the weights stay where the engine put them (its arena can free and restore their memory under it).

Anything that goes wrong on the way falls back to `torch.compile`, which compiles on first use: the package only
ever saves time. The file's name is a digest of everything the compiled code depends on (the torch, CUDA and Triton
versions, the GPU, the model's config, precision, our engine sources), so a stale package is never loaded; a file
that fails to load anyway, answers an example otherwise than the eager function, or took its last loading process
down with it is compiled again and replaced.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import platform
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Where packages go when no directory is given: next to the inductor cache they were compiled with.
DIRECTORY_NAME = "triton-rag-precompiled"
#: The package's file suffix (torch's name for an exported-program archive).
SUFFIX = ".pt2"
#: A dynamic dimension below this size runs eagerly: traced shapes are assumed >= 2 (sizes 0 and 1 specialise), and
#: the package checks no input's size at run time.
MIN_DYNAMIC_SIZE = 2


def default_directory() -> Path:
    """Inductor's cache directory (`TORCHINDUCTOR_CACHE_DIR`, else its default under the temporary directory),
    worked out here: asking inductor imports it, the ~1.3 s this module exists to save."""
    try:
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
    except (KeyError, OSError):  # no passwd entry for the uid (a container's arbitrary user), as inductor handles it
        user = f"uid_{os.getuid()}"
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return Path(root) / DIRECTORY_NAME


def artifact_key(parts: Sequence[str | bytes], sources: Sequence[Path]) -> str:
    """A digest of `parts` and the contents of `sources`, with what else compiled code depends on: the versions of
    Python, torch, CUDA and Triton, the GPU, inductor's settings in the environment, and this module."""
    triton_version = "none"
    for distribution in ("triton", "pytorch-triton"):  # not `import triton`: a load that finds its package never
        try:  # imports the compiler
            triton_version = f"{distribution} {metadata.version(distribution)}"
            break
        except metadata.PackageNotFoundError:
            continue
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


#: What compiling the function imports, ~2.4 s of a first load (H200 host, byte code cached, 2026-12-02).
COMPILER_MODULES = ("triton", "torch._dynamo", "torch._inductor.compile_fx", "torch.export")
#: The interpreter's thread switch interval while they import: the checkpoint's reader threads hold the GIL for
#: moments and would otherwise wait up to the default 5 ms for it each time (at 0.5 ms the read still ran at half
#: speed, 6-8 GiB/s against 13-16 on the H200 host).
IMPORT_SWITCH_INTERVAL = 0.0001


def import_compiler_in_background() -> Callable[[], float]:
    """Start importing `COMPILER_MODULES` in a thread, so that they overlap the checkpoint's read on a load that must
    compile; the returned function waits for the imports and returns the seconds it waited. A module that fails to
    import is left for the real import to report."""
    import importlib
    import sys

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


def _state(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers in the order the package takes them."""
    return [*module.parameters(), *module.buffers()]


class _Bound(nn.Module):
    """`function(module, *tensors)` as a module owning `module`, so `functional_call` can swap its state for inputs."""

    def __init__(self, function: Callable[..., torch.Tensor], module: nn.Module) -> None:
        super().__init__()
        self.function, self.module = function, module

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.function(self.module, *tensors)


class _StateAsInputs(nn.Module):
    """What is exported: the function with the module's state as inputs. The module is held out of the registry, so
    the export lifts none of its tensors into the package."""

    _bound: _Bound

    def __init__(self, function: Callable[..., torch.Tensor], module: nn.Module) -> None:
        super().__init__()
        bound = _Bound(function, module)
        object.__setattr__(self, "_bound", bound)
        self._names = [f"module.{name}" for name, _ in (*module.named_parameters(), *module.named_buffers())]

    def forward(self, tensors: list[torch.Tensor], state: list[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(self._bound, dict(zip(self._names, state, strict=True)), tuple(tensors))


def _expose_cxx_runtime() -> None:
    """Put the loaded libstdc++ in the process's global symbol scope, as LD_PRELOAD would. A package's library binds
    C++ runtime symbols (std::locale's facet ids) there; in a plain Python process libstdc++ is only torch's private
    dependency, the library then keeps ids of its own, and the first std::regex it builds crashes the process (seen on
    the H200 host, torch 2.11, g++ 13). A Triton stub, a C++ program, has it there already."""
    import ctypes

    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:  # another C++ runtime: nothing to promote
        pass


class PackagedFunction:
    """`function(module, *tensors)` run by a package's C++ runner, the module's state passed in; a call whose dynamic
    dimension is below `MIN_DYNAMIC_SIZE` runs `function` eagerly instead (the same arithmetic, unfused)."""

    def __init__(
        self,
        file: Path,
        function: Callable[..., torch.Tensor],
        dynamic: Sequence[tuple[int, int]],
        device: torch.device,
    ) -> None:
        self.function, self.dynamic = function, list(dynamic)
        self.eager_calls = 0  # calls that `function` answered
        index = (
            device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else -1)
        )
        _expose_cxx_runtime()
        # single-threaded: the runner's thread synchronisation would break CUDA-graph capture; the lock stands in
        # for it (it releases the GIL while it runs). It extracts the package to a temporary directory that it
        # removes when it is destroyed.
        self._runner = torch._C._aoti.AOTIModelPackageLoader(str(file), "model", True, 1, index)
        self._lock = threading.Lock()

    def __call__(self, module: nn.Module, *tensors: torch.Tensor) -> torch.Tensor:
        if any(tensors[argument].shape[dim] < MIN_DYNAMIC_SIZE for argument, dim in self.dynamic):
            self.eager_calls += 1
            return self.function(module, *tensors)
        inputs = [*tensors, *_state(module)]
        with self._lock:
            return self._runner.run(inputs)[0]


def _is_device_failure(error: BaseException) -> bool:
    """Out of memory or a CUDA error: the GPU's state, not the file's; it must surface, not trigger a recompile."""
    return isinstance(error, torch.OutOfMemoryError) or "CUDA error" in str(error)


def _package(
    function: Callable[..., torch.Tensor],
    example: tuple[Any, ...],
    dynamic: Sequence[tuple[int, int]],
    file: Path,
) -> None:
    """Export `function` on `example` (module first, then tensors; `dynamic`: (tensor index, dim) pairs left
    symbolic) and compile it into the package `file`."""
    from torch._inductor import aoti_compile_and_package
    from torch.export import Dim

    module, tensors = example[0], example[1:]
    with torch.inference_mode(False), torch.no_grad():  # export traces normal tensors; an engine's are inference ones
        inputs = [tensor.clone() for tensor in tensors]
        state = [tensor.clone() for tensor in _state(module)]
        shapes = [
            {dim: Dim.DYNAMIC for argument, dim in dynamic if argument == index} or None for index in range(len(inputs))
        ]
        exported = torch.export.export(
            _StateAsInputs(function, module), (inputs, state), dynamic_shapes=(shapes, [None] * len(state))
        )
        aoti_compile_and_package(exported, package_path=str(file))


#: A package must answer the example as the eager function does, to this cosine at least: loose, because fused
#: kernels round FP8 activations differently from eager ones (the GPU tests hold the packaged 4-layer model to
#: float32 within 0.98), while a package of other code answers far off (0.70 in tests/test_precompiled.py).
MIN_COSINE = 0.95


def _check_answers(packaged: PackagedFunction, function: Callable[..., torch.Tensor], example: tuple[Any, ...]) -> None:
    """ValueError unless the package answers the example as `function` does eagerly: loading checks only the number
    of inputs, so a package of another layout would otherwise run, and answer wrong, silently."""
    got, want = packaged(*example).float().flatten(), function(*example).float().flatten()
    cosine = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
    if not cosine >= MIN_COSINE:  # NaN fails too
        raise ValueError(f"its answer to the example differs from the eager function's (cosine {cosine:.4f})")


def _load_saved(
    file: Path, function: Callable[..., torch.Tensor], example: tuple[Any, ...], dynamic: Sequence[tuple[int, int]]
) -> PackagedFunction:
    """The saved package, checked. A marker file stands while it loads: a process that dies inside the package's
    native code (no exception to catch) leaves it behind, and the next load compiles the package again instead of
    dying the same way."""
    marker = file.with_name(f"{file.name}.loading")
    if marker.exists():
        marker.unlink(missing_ok=True)
        raise RuntimeError("an earlier load died while it loaded this package")
    with contextlib.suppress(OSError):  # a read-only cache: load without the marker
        marker.touch()
    try:
        packaged = PackagedFunction(file, function, dynamic, example[1].device)
        _check_answers(packaged, function, example)  # fails now, at load, rather than on a request
    finally:  # (a process that dies in native code never gets here: the marker stays)
        marker.unlink(missing_ok=True)
    return packaged


def compile_once(
    function: Callable[..., torch.Tensor],
    example: tuple[Any, ...],
    dynamic: Sequence[tuple[int, int]],
    file: Path | None,
    log: Callable[[str], None],
    started: float | None = None,
) -> Callable[..., torch.Tensor]:
    """`function(module, *tensors)` compiled for every shape: the package `file` when a usable one is there, else
    compiled ahead of time from `example` (the module, then the tensors, with values: the package's answer is checked
    against `function`'s; the `dynamic` (tensor index, dim) pairs left symbolic) and saved to `file` (with `file`
    None, into a temporary directory). Where the package cannot be built, `torch.compile` (compiling on first use),
    and a `<file>.failed` note so that later loads do not spend the build again. Call under the inference mode it
    will serve in. `started`: when the caller's part of this phase began (the times logged count from it)."""
    started = time.perf_counter() if started is None else started
    if file is not None and file.exists():
        try:
            packaged = _load_saved(file, function, example, dynamic)
            log(f"compiled layer loaded from {file.name} in {time.perf_counter() - started:.1f} s")
            return packaged
        except Exception as error:  # a torch that changed underneath, a truncated file: compile again
            if _is_device_failure(error):
                raise
            log(f"precompiled layer {file.name} unusable ({type(error).__name__}: {error}); compiling it again")
    failed = file.with_name(f"{file.name}.failed") if file is not None else None
    if failed is not None and failed.exists():
        log(
            f"ahead-of-time compilation failed on an earlier load ({failed.read_text().strip()}); compiling on first "
            f"use instead (delete {failed} to try again)"
        )
        return torch.compile(function, dynamic=True)
    scratch = Path(tempfile.mkdtemp(prefix="triton-rag-package-"))
    try:
        built = scratch / f"layer{SUFFIX}"
        try:
            _package(function, example, dynamic, built)
            packaged = PackagedFunction(built, function, dynamic, example[1].device)
            _check_answers(packaged, function, example)  # a package that answers wrong is neither served nor saved
        except Exception as error:
            if _is_device_failure(error):
                raise
            reason = f"{type(error).__name__}: {error}"
            log(f"ahead-of-time compilation failed ({reason}); compiling on first use instead")
            if failed is not None:
                with contextlib.suppress(OSError):
                    failed.parent.mkdir(parents=True, exist_ok=True)
                    failed.write_text(reason[:2000] + "\n")
            return torch.compile(function, dynamic=True)
        seconds = time.perf_counter() - started
        if file is None:
            log(f"layer compiled ahead of time in {seconds:.1f} s, not saved (no key for it)")
            return packaged
        partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built, partial)
            os.replace(partial, file)  # whole or absent: a concurrent load never reads half a file
            log(f"layer compiled ahead of time in {seconds:.1f} s, saved as {file.name}")
        except OSError as error:  # a read-only or full cache: serve what was compiled, unsaved
            partial.unlink(missing_ok=True)
            log(f"layer compiled ahead of time in {seconds:.1f} s, not saved ({error})")
        return packaged
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the runner has extracted what it needs
