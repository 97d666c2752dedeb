"""The compiled-function package on the CPU (AOTInductor's C++ backend): a save, a load that skips tracing and
imports none of the compiler, one package serving modules of other weights and other shapes, a damaged file compiled
again, a call below the traced sizes answered eagerly. The decoder layer itself goes through this path on the GPU
(tests/test_engine_cuda.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from triton_rag.engines import precompiled
from triton_rag.engines.precompiled import (
    PackagedFunction,
    artifact_key,
    compile_once,
    import_compiler_in_background,
)


class Projection(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(5, 4, generator=generator), requires_grad=False)
        self.shift: torch.Tensor
        self.register_buffer("shift", torch.randn(5, generator=generator))


def gated_projection(module: Projection, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Uses a module's parameter and buffer, and a tensor's length the way the decoder layer uses its longest
    segment's."""
    return torch.nn.functional.silu(x @ module.weight.t() + module.shift) * probe.shape[0]


DYNAMIC = [(0, 0), (1, 0)]


def _compile(
    file: Path, logs: list[str], function: Callable[..., torch.Tensor] = gated_projection
) -> Callable[..., torch.Tensor]:
    return compile_once(function, (Projection(0), torch.randn(6, 4), torch.empty(3)), DYNAMIC, file, logs.append)


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("inductor")
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def saved(inductor_cache: Path) -> Path:
    """One package compiled for the module's tests (each compile runs a C++ compiler for tens of seconds)."""
    file, logs = inductor_cache / "fn.pt2", []
    _compile(file, logs)
    assert file.exists() and "compiled ahead of time" in logs[-1] and "saved as fn.pt2" in logs[-1], logs
    return file


def test_a_saved_function_is_loaded_and_serves_other_modules_and_shapes(saved: Path) -> None:
    logs: list[str] = []
    loaded = _compile(saved, logs)
    assert isinstance(loaded, PackagedFunction) and "loaded from fn.pt2" in logs[-1], logs
    for seed, rows, length in ((0, 9, 5), (1, 2, 7), (2, 40, 2)):  # other weights: the state is an input
        module, x, probe = Projection(seed), torch.randn(rows, 4), torch.empty(length)
        torch.testing.assert_close(loaded(module, x, probe), gated_projection(module, x, probe))
    assert loaded.eager_calls == 0  # every call ran the package


def test_loading_a_package_imports_none_of_the_compiler(saved: Path) -> None:
    """What makes a cold load fast: a fresh process that loads and runs the package never imports dynamo, inductor,
    Triton or sympy (the compiler's ~2.4 s of imports on the H200 host)."""
    code = f"""
import sys, torch
from tests.test_precompiled import DYNAMIC, Projection, gated_projection
from triton_rag.engines.precompiled import PackagedFunction
packaged = PackagedFunction({str(saved)!r}, gated_projection, DYNAMIC, torch.device("cpu"))
module, x, probe = Projection(3), torch.randn(7, 4), torch.empty(4)
assert torch.allclose(packaged(module, x, probe), gated_projection(module, x, probe))  # (assert_close imports sympy)
from triton_rag.core.load_phases import compiler_packages_imported
print(compiler_packages_imported())
"""
    root = Path(__file__).parent.parent
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), str(root / "backends")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_a_damaged_file_is_compiled_again_and_replaced(saved: Path, tmp_path: Path) -> None:
    file, logs = tmp_path / "fn.pt2", []
    file.write_bytes(saved.read_bytes()[:1000])
    again = _compile(file, logs)
    assert any("unusable" in line for line in logs) and "compiled ahead of time" in logs[-1], logs
    module, x, probe = Projection(4), torch.randn(3, 4), torch.empty(4)
    torch.testing.assert_close(again(module, x, probe), gated_projection(module, x, probe))
    _compile(file, logs)
    assert "loaded from fn.pt2" in logs[-1], logs


def test_a_call_below_the_traced_sizes_runs_eagerly(saved: Path, tmp_path: Path) -> None:
    """Sizes 0 and 1 specialise when traced, and the package checks no sizes: such a call must not reach it."""
    copy = tmp_path / "fn.pt2"
    shutil.copyfile(saved, copy)
    loaded = _compile(copy, [])
    module = Projection(5)
    for x, probe in ((torch.randn(1, 4), torch.empty(6)), (torch.randn(6, 4), torch.empty(1))):
        torch.testing.assert_close(loaded(module, x, probe), gated_projection(module, x, probe))
    assert loaded.eager_calls == 2  # type: ignore[attr-defined]


def tanh_projection(module: Projection, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Takes the same inputs as `gated_projection` and answers otherwise."""
    return torch.tanh(x @ module.weight.t() + module.shift) * probe.shape[0]


def test_a_package_that_answers_otherwise_than_the_function_is_compiled_again(saved: Path, tmp_path: Path) -> None:
    """The runner checks only how many inputs it gets: a package of other code would run and answer wrong."""
    file, logs = tmp_path / "fn.pt2", []
    shutil.copyfile(saved, file)
    again = _compile(file, logs, tanh_projection)
    assert any("unusable" in line and "differs from the eager function" in line for line in logs), logs
    assert "compiled ahead of time" in logs[-1], logs
    module, x, probe = Projection(6), torch.randn(5, 4), torch.empty(3)
    torch.testing.assert_close(again(module, x, probe), tanh_projection(module, x, probe))


def test_a_load_that_died_inside_the_package_makes_the_next_compile_it_again(saved: Path, tmp_path: Path) -> None:
    """A crash in native code cannot be caught: its marker, left behind, is what the next load sees."""
    file, logs = tmp_path / "fn.pt2", []
    shutil.copyfile(saved, file)
    (tmp_path / "fn.pt2.loading").touch()
    _compile(file, logs)
    assert any("an earlier load died while it loaded this package" in line for line in logs), logs
    assert "compiled ahead of time" in logs[-1] and not (tmp_path / "fn.pt2.loading").exists(), logs
    _compile(file, logs)
    assert "loaded from fn.pt2" in logs[-1] and not (tmp_path / "fn.pt2.loading").exists(), logs


def test_a_failed_build_falls_back_to_torch_compile_and_is_not_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No C++ compiler, say: the load serves `torch.compile`, and later loads skip the build (tens of seconds)."""
    attempts: list[Path] = []

    def no_compiler(*args: object) -> None:
        attempts.append(Path(str(args[-1])))
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(precompiled, "_package", no_compiler)
    file, logs = tmp_path / "fn.pt2", []
    first = _compile(file, logs)
    assert not isinstance(first, PackagedFunction) and len(attempts) == 1
    assert "no C++ compiler found" in (tmp_path / "fn.pt2.failed").read_text()
    second = _compile(file, logs)
    assert not isinstance(second, PackagedFunction) and len(attempts) == 1, logs
    assert "failed on an earlier load" in logs[-1] and "fn.pt2.failed to try again" in logs[-1], logs


def test_the_key_follows_every_part_and_source(tmp_path: Path) -> None:
    source = tmp_path / "engine.py"
    source.write_text("a = 1\n")
    key = artifact_key(["fp8", "config"], [source])
    assert key == artifact_key(["fp8", "config"], [source])
    assert key != artifact_key(["bfloat16", "config"], [source])
    source.write_text("a = 2\n")
    assert key != artifact_key(["fp8", "config"], [source])


def test_the_compiler_imports_in_the_background_and_the_switch_interval_comes_back() -> None:
    """A load that must compile imports dynamo and inductor while the checkpoint is read, with a short switch
    interval for the reader threads meanwhile; afterwards the interpreter's interval is what it was."""
    before = sys.getswitchinterval()
    wait = import_compiler_in_background()
    assert wait() >= 0
    assert {"torch._dynamo", "torch._inductor.compile_fx", "torch.export"} <= set(sys.modules)
    assert sys.getswitchinterval() == before
