"""Triton python model `qwen_embed_encoder`; the implementation is triton_rag.triton.encoder.EncoderModel."""

from triton_rag.triton.encoder import EncoderModel as TritonPythonModel  # noqa: F401
