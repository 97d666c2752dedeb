"""Triton python model `docling`; the implementation is triton_rag.triton.docling.DoclingEndpoint."""

from triton_rag.triton.docling import DoclingEndpoint as TritonPythonModel  # noqa: F401
