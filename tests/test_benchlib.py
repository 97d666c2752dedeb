"""The benchmarks' process labels (tools/benchlib.py): which model a GPU process serves, read from /proc as the
memory sampler sees it, so a benchmark can say what each process held."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType

from tests.harness import PROJECT_ROOT


def _benchlib() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchlib", PROJECT_ROOT / "tools" / "benchlib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _program(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")


def test_a_stub_is_labelled_by_its_model_and_other_processes_by_their_program(tmp_path: Path) -> None:
    benchlib = _benchlib()
    model_file = tmp_path / "repository" / "qwen_embed_encoder" / "1" / "model.py"
    model_file.parent.mkdir(parents=True)
    model_file.write_text("")
    stub = tmp_path / "triton_python_backend_stub"  # a program of the stub's name that waits, as a stub does
    shutil.copy(shutil.which("cat") or "/bin/cat", stub)
    process = subprocess.Popen([str(stub), str(model_file), "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10  # until the exec: a forked child shows its parent's command line before it
        while not _program(process.pid).endswith(stub.name) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert benchlib.process_label(process.pid) == "stub qwen_embed_encoder"
    finally:
        process.communicate(b"")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while not _program(sleeper.pid).endswith("sleep") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert benchlib.process_label(sleeper.pid) == "sleep"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert benchlib.process_label(2**22 + 12345) == str(2**22 + 12345)  # no such process
