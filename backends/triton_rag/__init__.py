"""triton-rag: Qwen3 embeddings, Qwen3 reranking and Docling served by Triton on one GPU."""

__version__ = "0.1.0"
