"""Build and prepare time: rag.toml, model sources, engine plans, repository generation, exports. Never imported
inside Triton."""
