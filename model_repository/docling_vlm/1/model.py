"""Triton python model `docling_vlm`; the implementation is triton_rag.triton.docling.VlmModel."""

from triton_rag.triton.docling import VlmModel as TritonPythonModel  # noqa: F401
