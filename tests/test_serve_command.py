"""`triton-rag serve` (what `make serve` runs) in the foreground: ready on its ports, safe by default (loopback, the
admin key), stopped cleanly by a signal."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
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
from triton_rag.build.settings import EmbedSettings, RerankSettings, RouterSettings, Settings
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


def unmapped_shm_regions(names: set[str]) -> set[str]:
    """Of these /dev/shm names, the ones that still exist and that no live process maps: left behind."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            lines = maps.read_text().splitlines()
        except OSError:
            continue
        mapped |= {line.split("/dev/shm/")[1].strip() for line in lines if "/dev/shm/" in line}
    return {name for name in names if (Path("/dev/shm") / name).exists()} - mapped


def test_serve_stops_under_load_answering_what_is_in_flight_and_leaving_nothing_behind(
    tiny_embed_dir: Path, tiny_rerank_dir: Path, tmp_path: Path
) -> None:
    """Issue 23, item 6: SIGTERM while 8 clients embed and rerank under a budget that fits one encoder at a time (the
    router swaps them). Every request gets an answer: its result, or a clear refusal (the endpoint is gone, the
    server stops), never INTERNAL and never a hang; serve exits 0 in time; tritonserver does not abort on its way out
    and no python-backend /dev/shm region is left unmapped."""
    repository = tmp_path / "repository"
    settings = Settings(
        embed=EmbedSettings(model=str(tiny_embed_dir), max_length=512),
        rerank=RerankSettings(model=str(tiny_rerank_dir), max_length=512),
        router=RouterSettings(budget="800MiB", min_residency_seconds=0.0),  # the tiny encoders: 581 MiB estimated
        offline_fallback=False,
    )
    prepare_repository(settings, repository, CACHE_DIR, endpoints=("embed", "rerank"))
    ports = free_ports()
    shm_before = set(os.listdir("/dev/shm"))
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            serve_command(repository, ports, "--cache-dir", str(CACHE_DIR), "--no-gateway"),
            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"127.0.0.1:{ports.grpc}"
    stop = threading.Event()
    answers: list[tuple[float, str]] = []  # (when it ended, "ok" or the error's first line)
    lock = threading.Lock()

    def client(index: int) -> None:
        triton = grpcclient.InferenceServerClient(url)
        while not stop.is_set():
            try:
                if index % 2:
                    triton.infer(contract.EMBED_ENDPOINT, [strings("TEXT", [f"text {index} " * 20])], client_timeout=90)
                else:
                    pair = [strings("QUERY", ["q"]), strings("DOCUMENT", [f"document {index} " * 20])]
                    triton.infer(contract.RERANK_ENDPOINT, pair, client_timeout=90)
                outcome = "ok"
            except InferenceServerException as exc:
                outcome = str(exc).splitlines()[0]
            with lock:
                answers.append((time.monotonic(), outcome))
            if outcome.startswith("[StatusCode.UNAVAILABLE] failed to connect"):
                return  # the server is gone

    threads = [threading.Thread(target=client, args=(index,), daemon=True) for index in range(8)]
    try:
        assert wait_until(lambda: ready(ports.http) or process.poll() is not None, 300), "server never got ready"
        for thread in threads:
            thread.start()
        assert wait_until(lambda: sum(outcome == "ok" for _, outcome in answers) >= 20, 120), answers[-5:]
        signalled = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=90) == 0
        stopped = time.monotonic()
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a client still waits for an answer"
    late = [outcome for ended, outcome in answers if ended > signalled]
    assert "ok" in late  # requests in flight at the signal were answered
    assert not [outcome for outcome in late if "INTERNAL" in outcome], late
    assert stopped - signalled < 60
    text = log_path.read_text()
    assert "endpoints stopped in" in text and "lock_exception" not in text and "Signal (6)" not in text
    assert wait_until(lambda: not unmapped_shm_regions(set(os.listdir("/dev/shm")) - shm_before), 10)
