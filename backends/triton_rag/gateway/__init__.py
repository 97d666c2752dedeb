"""The RAG front door: a process beside tritonserver that answers the HTTP APIs RAG stacks speak (OpenAI
`/v1/embeddings`, Cohere/Jina `/v1/rerank` and Cohere `/v2/rerank`, docling-serve `/v1/convert/*`) by calling the
Triton endpoints over async gRPC. It holds no model: every request goes through Triton, and so through the router's
memory budget. `triton-rag serve` starts it after tritonserver and stops it with tritonserver (docs/ARCHITECTURE.md).

Modules, one owner each: `errors` (the typed errors and each API's error shape), `metrics` (Prometheus), `tokens`
(the real tokenizer: usage counts and limits before any work), `catalog` (what the prepared repository serves),
`triton` (the gRPC shell), `embeddings`, `rerank`, `convert` (each API's request models, pure decisions and route),
`app` (the application: keys, body limit, routes), `__main__` (the process). Nothing here imports torch, Triton's
python backend, the engines or the adapters in `triton/`.
"""
