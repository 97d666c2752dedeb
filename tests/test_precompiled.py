"""The precompiled-function cache on the CPU (inductor's C++ backend): a save, a load that skips tracing and answers
the same for other shapes, a damaged file compiled again, a call outside the saved guards still answered. The
decoder layer itself goes through this path on the GPU (tests/test_engine_cuda.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from triton_rag.engines.precompiled import artifact_key, compile_once, import_compiler_in_background


def gated_scale(x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Depends on a tensor's length the way the decoder layer does on its longest segment."""
    return torch.nn.functional.silu(x) * probe.shape[0]


def _compile(file: Path, logs: list[str]) -> Callable[..., torch.Tensor]:
    x, probe = torch.randn(6, 4), torch.empty(3)
    return compile_once(gated_scale, (x, probe), [(x, 0), (probe, 0)], file, logs.append)


@pytest.fixture(autouse=True)
def _fresh_inductor_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def test_a_saved_function_is_loaded_and_serves_other_shapes(tmp_path: Path) -> None:
    file, logs = tmp_path / "fn.bin", []
    _compile(file, logs)
    assert file.exists() and "compiled ahead of time" in logs[-1]
    loaded = _compile(file, logs)
    assert f"loaded from {file.name}" in logs[-1]
    for rows, length in ((9, 5), (2, 7), (40, 2)):
        x, probe = torch.randn(rows, 4), torch.empty(length)
        torch.testing.assert_close(loaded(x, probe), gated_scale(x, probe))


def test_a_damaged_file_is_compiled_again_and_replaced(tmp_path: Path) -> None:
    file, logs = tmp_path / "fn.bin", []
    _compile(file, logs)
    file.write_bytes(b"not a compiled function")
    again = _compile(file, logs)
    assert any("unusable" in line for line in logs) and "compiled ahead of time" in logs[-1]
    x, probe = torch.randn(3, 4), torch.empty(4)
    torch.testing.assert_close(again(x, probe), gated_scale(x, probe))
    _compile(file, logs)
    assert f"loaded from {file.name}" in logs[-1]


def test_a_call_outside_the_saved_guards_is_still_answered(tmp_path: Path) -> None:
    file, logs = tmp_path / "fn.bin", []
    _compile(file, logs)
    loaded = _compile(file, logs)
    x, probe = torch.randn(1, 4), torch.empty(1)  # size 1: the saved code was specialised for sizes >= 2
    torch.testing.assert_close(loaded(x, probe), gated_scale(x, probe))
    assert loaded.fell_back  # type: ignore[attr-defined]  # answered by torch.compile, not the saved code


def test_the_key_follows_every_part_and_source(tmp_path: Path) -> None:
    source = tmp_path / "engine.py"
    source.write_text("a = 1\n")
    key = artifact_key(["fp8", "config"], [source])
    assert key == artifact_key(["fp8", "config"], [source])
    assert key != artifact_key(["bfloat16", "config"], [source])
    source.write_text("a = 2\n")
    assert key != artifact_key(["fp8", "config"], [source])


def test_the_compiler_imports_in_the_background_and_the_switch_interval_comes_back() -> None:
    """The cold load imports dynamo and inductor while the checkpoint is read, with a short switch interval for the
    reader threads meanwhile; afterwards the interpreter's interval is what it was."""
    before = sys.getswitchinterval()
    wait = import_compiler_in_background()
    assert wait() >= 0
    assert {"torch._dynamo", "torch._inductor.compile_fx"} <= set(sys.modules)
    assert sys.getswitchinterval() == before
