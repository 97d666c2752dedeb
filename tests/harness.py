"""Running the real tritonserver for tests: one helper shared by every server fixture."""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from triton_rag import contract
from triton_rag.build.model_config import build_config, render
from triton_rag.client import AdminHeader
from triton_rag.server import Ports, TritonServer, free_ports

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



def add_page_stand_in(
    repository: Path, page_model: str, page_py: str, document_model: str, document_instances: int | None = None
) -> None:
    """Into a prepared docling repository: a python page model `page_model` (the `docling` contract, no batching)
    running `page_py`, and a copy of `docling_document` named `document_model` that sends its pages to it (with
    `document_instances` instances where given); both loaded at start-up. What the document endpoint does around
    the page model (rendering, merging, errors) is then tested apart from the VLM."""
    endpoint = contract.docling_endpoint()
    page = type(endpoint)(**{**endpoint.__dict__, "name": page_model, "dynamic_batching": None})
    (repository / page_model / "1").mkdir(parents=True)
    (repository / page_model / "config.pbtxt").write_text(render(build_config(page, backend="python"), ""))
    (repository / page_model / "1" / "model.py").write_text(page_py)
    config = (repository / contract.DOCLING_DOCUMENT_ENDPOINT / "config.pbtxt").read_text()
    config = config.replace(f'name: "{contract.DOCLING_DOCUMENT_ENDPOINT}"', f'name: "{document_model}"')
    config = config.replace(f'string_value: "{contract.DOCLING_ENDPOINT}"', f'string_value: "{page_model}"')
    if document_instances is not None:
        config = re.sub(r"instance_group \{\s*count: \d+", f"instance_group {{\n  count: {document_instances}", config)
        assert f"count: {document_instances}" in config
    (repository / document_model / "1").mkdir(parents=True)
    (repository / document_model / "config.pbtxt").write_text(config)
    model_py = (repository / contract.DOCLING_DOCUMENT_ENDPOINT / "1" / "model.py").read_text()
    (repository / document_model / "1" / "model.py").write_text(model_py)
    prepared = json.loads((repository / ".prepared.json").read_text())
    prepared["startup_models"] += [page_model, document_model]
    (repository / ".prepared.json").write_text(json.dumps(prepared))


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since the last reset: write "5" to /proc/<pid>/clear_refs) of a process, in
    bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def serve_command(repository: Path, ports: Ports, *options: str) -> list[str]:
    """`triton-rag serve` (what `make serve` runs) on a prepared `repository` and these ports, as a test starts it
    in a process of its own; `options` are added (a cache directory, --no-gateway, a gateway port)."""
    return [
        sys.executable, "-m", "triton_rag", "serve", "--no-prepare", "--repository", str(repository),
        "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
        *options,
    ]  # fmt: skip


def landscape_failing_page_py(doctags: str) -> str:
    """model.py of a stand-in for the `docling` page model (fault injection, not a mock of what is tested): it
    answers every portrait page with `doctags` and its DoclingDocument, and fails every landscape page, so that
    what is built around the page model (docling_document's merge and page errors, the gateway's conversions) can
    be checked exactly without the VLM."""
    return textwrap.dedent(
        f"""
        import io
        import numpy as np
        import triton_python_backend_utils as pb_utils
        from PIL import Image
        from triton_rag.core.doctags import PageTags, pages_to_document

        class TritonPythonModel:
            def execute(self, requests):
                responses = []
                for request in requests:
                    data = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy().reshape(-1)[0]
                    image = Image.open(io.BytesIO(bytes(data)))
                    if image.width > image.height:
                        error = pb_utils.TritonError("injected failure for a landscape page")
                        responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                        continue
                    document = pages_to_document([PageTags({doctags!r}, image.convert("RGB"))], name="page")
                    tags = np.array([[{doctags!r}.encode()]], dtype=np.object_)
                    json_out = np.array([[document.model_dump_json().encode()]], dtype=np.object_)
                    responses.append(pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("STRUCTURED_JSON", json_out), pb_utils.Tensor("DOCTAGS", tags)]))
                return responses
        """
    )
