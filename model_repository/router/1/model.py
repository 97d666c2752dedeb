"""Triton python model `router`; the implementation is triton_rag.triton.router.model.RouterModel."""

from triton_rag.triton.router.model import RouterModel as TritonPythonModel  # noqa: F401
