"""The contract between the models: tensors (`tensors`) and typed per-model parameters (`params`).

`from triton_rag import contract` gives the tensor contract's names (contract.EMBED_ENDPOINT, ...)."""

from triton_rag.contract.tensors import *  # noqa: F403
