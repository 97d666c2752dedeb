"""`triton-rag serve` (what `make serve` runs) in the foreground: ready on its ports, safe by default (loopback, the
admin key), stopped cleanly by a signal."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.harness import CACHE_DIR, PROJECT_ROOT, serve_command, strings, wait_until
from triton_rag import contract
from triton_rag.build.repository import prepare_repository
from triton_rag.build.settings import EmbedSettings, Settings
from triton_rag.core import admin
from triton_rag.server import free_ports, pytriton_root
from triton_rag.triton.router.memory import STUB_NAME

pytestmark = pytest.mark.server


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def process_environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(entry.partition("=")[::2] for entry in entries if entry)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def read_metrics(port: int) -> bytes:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return bytes(response.read())
    except OSError:
        return b""


def repository_index_status(port: int, headers: dict[str, str]) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/repository/index", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_runs_in_the_foreground_and_stops_cleanly_on_a_signal(
    tiny_embed_dir: Path, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    # A repository of its own, so that the processes it names belong to this server alone.
    qwen_repository = tmp_path / "repository"
    settings = Settings(embed=EmbedSettings(model=str(tiny_embed_dir)), offline_fallback=False)
    prepare_repository(settings, qwen_repository, CACHE_DIR, endpoints=("embed",))
    ports = free_ports()
    # no key given: serve makes one in its cache directory (a fresh one here) and hands it to tritonserver
    cache_dir = tmp_path / "cache"
    environment = {k: v for k, v in os.environ.items() if k not in (admin.KEY_ENV, "TORCHINDUCTOR_CACHE_DIR")}
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(
        serve_command(qwen_repository, ports, "--cache-dir", str(cache_dir)),
        cwd=PROJECT_ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_until(lambda: ready(ports.http) or process.poll() is not None, 300), "server never got ready"
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        # tritonserver opens its endpoints one after another: metrics may listen a moment after HTTP says ready
        assert wait_until(lambda: b"nv_inference_count" in read_metrics(ports.metrics), 30), "no metrics"
        assert processes_mentioning(str(qwen_repository)), "expected the server and its python stubs"
        key_file = cache_dir / "admin.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        [server] = processes_mentioning(f"--http-port={ports.http}")
        server_pid = int(server.split(":")[0])
        arguments = Path(f"/proc/{server_pid}/cmdline").read_bytes().decode().split("\0")
        assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(arguments)
        server_environment = process_environment(server_pid)
        assert server_environment[admin.KEY_ENV] == key  # what the python stubs inherit
        assert server_environment["TORCHINDUCTOR_CACHE_DIR"] == str(cache_dir.resolve() / "inductor")
        assert repository_index_status(ports.http, {}) == 403
        assert repository_index_status(ports.http, {admin.KEY_NAME: key}) == 200
        os.kill(process.pid, stop_signal)
        assert process.wait(timeout=60) == 0
        # Nothing of this server is left: no tritonserver, no orphaned python backend stub.
        assert wait_until(lambda: not processes_mentioning(f"--http-port={ports.http}"), 10)
        assert wait_until(lambda: not processes_mentioning(str(qwen_repository)), 10), processes_mentioning(
            str(qwen_repository)
        )
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def test_serve_restarts_tritonserver_when_a_dead_stub_wedged_a_model(tiny_embed_dir: Path, tmp_path: Path) -> None:
    """Issue 23: a stub dead before its first message leaves tritonserver 2.51 waiting for it (the model cannot load
    again: python_backend #408). `serve` sees the router name the model as wedged, restarts tritonserver cleanly and
    says so; the model then loads and answers. The embedder's own `triton_python_backend_stub` dies at once while the
    first tritonserver lives (the marker holds its pid), and runs the real stub for the next one."""
    repository = tmp_path / "repository"
    settings = Settings(embed=EmbedSettings(model=str(tiny_embed_dir)), offline_fallback=False)
    prepare_repository(settings, repository, CACHE_DIR, endpoints=("embed",))  # the router on: loads on first use
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    real_stub = pytriton_root() / "tritonserver" / "python_backend_stubs" / version / STUB_NAME
    marker = tmp_path / "first-server-pid"
    stub = repository / contract.EMBED_ENCODER / STUB_NAME
    stub.write_text(
        f'#!/bin/sh\nif kill -0 "$(cat "{marker}" 2>/dev/null)" 2>/dev/null; then kill -KILL $$; fi\n'
        f'exec "{real_stub}" "$@"\n'
    )
    stub.chmod(0o755)
    ports, cache_dir = free_ports(), tmp_path / "cache"
    environment = {k: v for k, v in os.environ.items() if k not in (admin.KEY_ENV, "TORCHINDUCTOR_CACHE_DIR")}
    log_path = tmp_path / "serve.log"
    command = serve_command(repository, ports, "--cache-dir", str(cache_dir), "--no-gateway")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{ports.grpc}"
    try:
        assert wait_until(lambda: ready(ports.http) or process.poll() is not None, 300), "server never got ready"
        [first_server] = processes_mentioning(f"--http-port={ports.http}")
        marker.write_text(first_server.split(":")[0])
        client = grpcclient.InferenceServerClient(url)
        with pytest.raises(InferenceServerException, match="died while loading"):
            client.infer(contract.EMBED_ENDPOINT, [strings("TEXT", ["hello"])])
        answers: list[np.ndarray] = []

        def answered() -> bool:
            try:
                answer = grpcclient.InferenceServerClient(url).infer(contract.EMBED_ENDPOINT, [strings("TEXT", ["hi"])])
            except InferenceServerException:
                return False
            answers.append(answer.as_numpy("EMBEDDING"))
            return True

        assert wait_until(answered, 120, interval=1.0), log_path.read_text()[-3000:]
        assert answers[-1].shape[0] == 1
        text = log_path.read_text()
        assert "restarting tritonserver: it cannot load a model again until it restarts" in text
        assert "tritonserver restarted and ready" in text
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
