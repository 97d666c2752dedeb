"""engines/cuda_checkpoint.py where the driver's checkpoint API cannot be used (this machine: no CUDA driver): the
helper process answers with the reason, the release is refused once and stays off, a restore of a process never
checkpointed does nothing. On a GPU the release itself is tested in tests/test_weight_arena_cuda.py."""

from __future__ import annotations

import ctypes.util
import os

import pytest

from triton_rag.engines.cuda_checkpoint import ContextRelease, run_helper

pytestmark = pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="a CUDA driver is present")


def test_the_helper_names_why_it_cannot_checkpoint() -> None:
    ok, detail = run_helper("checkpoint", os.getpid())
    assert not ok
    assert "no CUDA driver" in detail


def test_a_refused_release_is_logged_once_and_leaves_the_context() -> None:
    lines: list[str] = []
    context = ContextRelease(lines.append)
    assert context.release() is False
    assert context.release() is False
    assert context.unavailable is not None and "no CUDA driver" in context.unavailable
    assert len(lines) == 1 and "stays on the GPU" in lines[0]
    assert context.restore() == 0.0  # never checkpointed: nothing to restore
