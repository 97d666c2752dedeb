"""A healthy start on a machine without a GPU is quiet: tritonserver's log has no error-level line (its defaults log
NVML, CUDA-driver and DCGM errors there, all harmless), and the launcher says once, plainly, that no GPU was found."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from tests.harness import CACHE_DIR
from triton_rag.server import CPU_ONLY_FLAGS, TritonServer, free_ports, gpu_present

pytestmark = pytest.mark.server

#: Triton's error prefix: "E" and the month and day (glog), e.g. `E1203 13:13:58.807605 32622 server.cc:241] ...`.
ERROR_LINE = re.compile(r"^E\d{4} ")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.skipif(gpu_present(), reason="a machine with a GPU: tritonserver keeps its GPU defaults")
def test_a_cpu_start_logs_no_error_line_and_says_once_that_no_gpu_was_found(tmp_path: Path) -> None:
    repository = tmp_path / "repository"  # empty: the start-up itself is what is checked
    repository.mkdir()
    launcher = logging.getLogger("triton_rag.server")
    said = _Lines()
    launcher.addHandler(said)
    level = launcher.level
    launcher.setLevel(logging.INFO)
    log_path = tmp_path / "tritonserver.log"
    try:
        with open(log_path, "wb") as log:
            server = TritonServer(repository, CACHE_DIR, free_ports(), load_models=[], log=log)
            assert all(flag in server.command for flag in CPU_ONLY_FLAGS)
            server.start()
            try:
                server.wait_ready(120)
            finally:
                server.stop()
    finally:
        launcher.removeHandler(said)
        launcher.setLevel(level)
    text = log_path.read_text(errors="replace")
    assert "Started GRPCInferenceService" in text and "Started Metrics Service" in text, text  # the whole start
    assert [line for line in text.splitlines() if ERROR_LINE.match(line)] == [], text
    for alarming in ("NVML", "DCGM", "CudaDriverHelper", "CUDA driver version is insufficient"):
        assert alarming not in text, text
    assert [line for line in said.lines if "GPU" in line] == [
        "no GPU found (no CUDA driver or device): tritonserver runs on the CPU only"
    ]
