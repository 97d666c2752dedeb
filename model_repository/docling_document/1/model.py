"""Triton python model `docling_document`; the implementation is triton_rag.triton.docling.DoclingDocumentEndpoint."""

from triton_rag.triton.docling import DoclingDocumentEndpoint as TritonPythonModel  # noqa: F401
