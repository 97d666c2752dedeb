"""Triton python model `qwen_embed`; the implementation is triton_rag.triton.endpoints.EmbedEndpoint."""

from triton_rag.triton.endpoints import EmbedEndpoint as TritonPythonModel  # noqa: F401
