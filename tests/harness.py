"""Running the real tritonserver for tests: one helper shared by every server fixture."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from triton_rag.client import AdminHeader
from triton_rag.server import TritonServer, free_ports

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("TRITON_RAG_CACHE", PROJECT_ROOT / ".cache"))
SERVER_START_TIMEOUT = 300.0


class RunningServer:
    def __init__(self, server: TritonServer, log_path: Path, repository: Path) -> None:
        self.server = server
        self.log_path = log_path
        self.repository = repository

    def client(self) -> grpcclient.InferenceServerClient:
        """A gRPC client with the admin key (the operator's): the repository API works through it."""
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        client.register_plugin(AdminHeader(self.server.admin_key))
        return client

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(repository: Path, log_path: Path) -> Iterator[RunningServer]:
    with open(log_path, "wb") as log:
        server = TritonServer(repository, CACHE_DIR, free_ports(), log=log)
        server.start()
        running = RunningServer(server, log_path, repository)
        try:
            try:
                server.wait_ready(SERVER_START_TIMEOUT)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n--- server log ---\n{running.log_tail()}") from exc
            yield running
        finally:
            server.stop()


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.25) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """`wait_until`, failing the test with what it waited for."""
    if not wait_until(condition, timeout, interval=0.2):
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def router_metrics(server: RunningServer) -> dict[str, float]:
    """The router's series on Triton's metrics port, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.ports.metrics}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    series = (line.rsplit(" ", 1) for line in lines if line.startswith("rag_router_"))
    return {key: float(value) for key, value in series}


def strings(name: str, values: list[str] | list[bytes]) -> grpcclient.InferInput:
    data = np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=object)
    tensor = grpcclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def embed(server: RunningServer, texts: list[str], instruction: str | None = None) -> np.ndarray:
    inputs = [strings("TEXT", texts)]
    if instruction is not None:
        inputs.append(strings("INSTRUCTION", [instruction] * len(texts)))
    result = server.client().infer("qwen_embed", inputs)
    return result.as_numpy("EMBEDDING")


def rerank(server: RunningServer, pairs: list[tuple[str, str]], instruction: str | None = None) -> np.ndarray:
    inputs = [strings("QUERY", [q for q, _ in pairs]), strings("DOCUMENT", [d for _, d in pairs])]
    if instruction is not None:
        inputs.append(strings("INSTRUCTION", [instruction] * len(pairs)))
    return server.client().infer("qwen_rerank", inputs).as_numpy("SCORE").reshape(-1)


def assert_same_results(actual: np.ndarray, expected: np.ndarray) -> None:
    """The same model's answer again, after a swap, a sleep or a reload: equal up to float32 summation order. On a CPU
    the BLAS kernels' blocking can follow the buffers' alignment, so a new stub process (or a re-created arena) may
    sum in another order: a reranker score once differed by 2.4e-5, and an FP16 embedding can then round one unit
    apart. Wrong weights or another model differ by orders of magnitude more."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, actual.dtype)
    tolerance = 1e-3 if expected.dtype == np.float16 else 1e-4
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=0, atol=tolerance)

