"""Triton python model `router`; the implementation is triton_rag.triton.router.RouterModel."""

from triton_rag.triton.router import RouterModel as TritonPythonModel  # noqa: F401
