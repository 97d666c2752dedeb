"""What a stub tells about its own start: imports that ran from source because no byte code is cached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BACKENDS = Path(__file__).resolve().parent.parent / "backends"


def _uncached_after_import(module_dir: Path, write_bytecode: bool) -> str:
    """Imports `probe` from `module_dir` in a fresh interpreter and reports what it found without byte code."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHONPYCACHEPREFIX")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    flags = [] if write_bytecode else ["-B"]  # -B: as PYTHONDONTWRITEBYTECODE=1
    code = (
        f"import sys; sys.path[:0] = [{str(module_dir)!r}, {str(BACKENDS)!r}]; import probe; "
        "from triton_rag.core.load_phases import imported_without_bytecode; "
        "print(imported_without_bytecode(['probe', 'json', 'not_imported']))"
    )
    done = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, check=True, env=env)
    return done.stdout.strip()


def test_a_module_compiled_from_source_is_named_until_its_byte_code_is_cached(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text("VALUE = 1\n")
    assert _uncached_after_import(tmp_path, write_bytecode=False) == "['probe']"
    assert not (tmp_path / "__pycache__").exists()
    assert _uncached_after_import(tmp_path, write_bytecode=True) == "[]"  # written by this import before the check
    assert _uncached_after_import(tmp_path, write_bytecode=False) == "[]"  # read from the cache, nothing written
