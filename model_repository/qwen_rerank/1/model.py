"""Triton python model `qwen_rerank`; the implementation is triton_rag.triton.endpoints.RerankEndpoint."""

from triton_rag.triton.endpoints import RerankEndpoint as TritonPythonModel  # noqa: F401
