"""The benchmarks' process labels (tools/benchlib.py): which model a GPU process serves, read from /proc as the
memory sampler sees it, so a benchmark can say what each process held."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest

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


# perf_analyzer 2.41.0's own output (make test-tools' binary against a one-model tritonserver on a CPU): a stable
# measurement (exit code 0), and `--max-trials 2`, which can never be stable (it compares the last 3 windows): exit
# code 2 with this on stderr, the same words a busy machine gets after 4 windows.
STABLE_STDOUT = """\
 Successfully read data for 1 stream/streams with 1 step/steps.
*** Measurement Settings ***
  Batch size: 1
  Service Kind: Triton
  Using "time_windows" mode for stabilization
  Measurement window: 500 msec
  Using synchronous calls for inference
  Stabilizing using average latency

Request concurrency: 1
  Client: 
    Request count: 7551
    Throughput: 4188.25 infer/sec
    Avg latency: 236 usec (standard deviation 228 usec)
    p50 latency: 190 usec
    p90 latency: 323 usec
    p95 latency: 362 usec
    p99 latency: 521 usec
    Avg gRPC time: 230 usec ((un)marshal request/response 2 usec + response wait 228 usec)
  Server: 
    Inference count: 7551
    Execution count: 7551
    Successful request count: 7551
    Avg request latency: 123 usec (overhead 1 usec + queue 12 usec + compute input 9 usec + compute infer 55 usec + compute output 45 usec)

Inferences/Second vs. Client Average Batch Latency
Concurrency: 1, throughput: 4188.25 infer/sec, latency 236 usec
"""  # noqa: W291, E501
UNSTABLE_STDOUT = STABLE_STDOUT.split("  Client:", 1)[0]
UNSTABLE_STDERR = """\
Failed to obtain stable measurement within 2 measurement windows for concurrency 1. Please try to increase the \
--measurement-interval.
Failed to obtain stable measurement.
"""


def test_a_perf_analyzer_report_is_read_and_an_unstable_one_is_marked_not_raised() -> None:
    benchlib = _benchlib()
    assert benchlib.read_perf_report(STABLE_STDOUT, 0, 1) == {
        "concurrency": 1, "infer_per_s": 4188.25, "p50_ms": 0.19, "p99_ms": 0.521, "unstable": False,
    }  # fmt: skip
    unstable = benchlib.read_perf_report(UNSTABLE_STDOUT + UNSTABLE_STDERR, 2, 8)
    assert unstable == {"concurrency": 8, "infer_per_s": None, "p50_ms": None, "p99_ms": None, "unstable": True}
    assert benchlib.measured(unstable, "p50_ms") == benchlib.UNSTABLE == "unstable"
    assert benchlib.measured(benchlib.read_perf_report(STABLE_STDOUT, 0, 1), "infer_per_s", 2.0, None) == 8376
    with pytest.raises(RuntimeError, match="exit code 99"):  # any other failure still ends the run
        benchlib.read_perf_report("error: Failed to init manager inputs: unable to find float data in json\n", 99, 1)
    with pytest.raises(RuntimeError, match="could not read"):
        benchlib.read_perf_report(UNSTABLE_STDOUT, 0, 1)


def fake_perf_analyzer(tmp_path: Path, stable_from_call: int | None) -> tuple[Path, Path]:
    """A stand-in for perf_analyzer (no server, no timing): it records its arguments, one line per call, and prints the
    real binary's unstable output (exit code 2) until call `stable_from_call` (1-based), then its stable report."""
    (tmp_path / "stable.txt").write_text(STABLE_STDOUT)
    (tmp_path / "unstable-out.txt").write_text(UNSTABLE_STDOUT)
    (tmp_path / "unstable-err.txt").write_text(UNSTABLE_STDERR)
    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake_perf_analyzer"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
n=$(wc -l < {calls})
if [ {stable_from_call or 0} -gt 0 ] && [ "$n" -ge {stable_from_call or 0} ]; then cat {tmp_path}/stable.txt; exit 0; fi
cat {tmp_path}/unstable-out.txt; cat {tmp_path}/unstable-err.txt >&2; exit 2
""")
    script.chmod(0o755)
    return script, calls


def _option(call: str, name: str) -> str:
    words = call.split()
    return words[words.index(name) + 1]


@pytest.mark.parametrize("stable_from_call", [None, 2])
def test_an_unstable_measurement_is_retried_once_with_longer_windows_then_marked(
    tmp_path: Path, stable_from_call: int | None
) -> None:
    benchlib = _benchlib()
    binary, calls = fake_perf_analyzer(tmp_path, stable_from_call)
    data = tmp_path / "data.json"
    data.write_text('{"data": []}')
    report = benchlib.perf_analyzer(str(binary), "127.0.0.1:1", "qwen_embed", data, 4, tmp_path / "log.txt", 1000)
    made = calls.read_text().splitlines()
    assert len(made) == 2  # one retry, no more
    assert [_option(call, "--measurement-interval") for call in made] == ["1000", "2000"]
    assert [_option(call, "--max-trials") for call in made] == ["4", "8"]
    assert (tmp_path / "log.txt").read_text().count("Request concurrency: 1") == 2  # both attempts kept
    if stable_from_call is None:
        assert report["unstable"] is True
        assert report["infer_per_s"] is None
    else:
        assert report["unstable"] is False
        assert report["infer_per_s"] == 4188.25
    assert report["window_ms"] == 2000


def test_a_stable_first_measurement_runs_perf_analyzer_once(tmp_path: Path) -> None:
    benchlib = _benchlib()
    binary, calls = fake_perf_analyzer(tmp_path, stable_from_call=1)
    data = tmp_path / "data.json"
    data.write_text('{"data": []}')
    report = benchlib.perf_analyzer(str(binary), "127.0.0.1:1", "qwen_embed", data, 1, tmp_path / "log.txt", 1000)
    assert len(calls.read_text().splitlines()) == 1
    assert report["p99_ms"] == 0.521 and report["window_ms"] == 1000
