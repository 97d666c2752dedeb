"""Triton's repository API over gRPC on localhost: what the router's worker threads load, unload, ask and read with.

Not pb_utils.load_model & co: on Triton 2.51 a failing call of those on any thread but the stub's main thread aborts
tritonserver (found while testing a load of corrupt weights), and the main thread must stay free (docs/ROUTER.md, Why
the router loads through Triton's gRPC API). Every call here blocks: only worker threads make them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from triton_rag import contract
from triton_rag.core.admin import GRPC_KEY_HEADER, KEY_NAME

#: How long a look at the repository index may take (a server still starting may not answer).
INDEX_TIMEOUT_SECONDS = 10
UNLOAD_TIMEOUT_SECONDS = 60


class RepositoryApi:
    def __init__(self, url: str, load_timeout: float, key: str) -> None:
        self.url = url
        self.load_timeout = load_timeout
        self._headers = {GRPC_KEY_HEADER: key}  # Triton's restricted repository API (server.py) wants it
        self._key = key  # and the encoders' sleep and wake

    def _client(self) -> Any:
        """A fresh client per call: a channel opened before tritonserver listened keeps failing for a while (gRPC
        reconnect backoff), and these calls are rare and slow next to a channel's set-up."""
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url)

    def load(self, name: str) -> None:
        self._client().load_model(name, headers=self._headers, client_timeout=self.load_timeout)

    def unload(self, name: str) -> None:
        self._client().unload_model(name, headers=self._headers, client_timeout=UNLOAD_TIMEOUT_SECONDS)

    def residency(self, name: str, action: str) -> dict[str, Any]:
        """A control request to a PyTorch encoder (contract.RESIDENCY_OUTPUT): sleep, wake or status."""
        import tritonclient.grpc as grpcclient

        inputs = []
        for tensor_name, value in (("INPUT_IDS", 0), ("ATTENTION_MASK", 1)):
            tensor = grpcclient.InferInput(tensor_name, [1, 1], "INT64")
            tensor.set_data_from_numpy(np.full((1, 1), value, dtype=np.int64))
            inputs.append(tensor)
        result = self._client().infer(
            name,
            inputs,
            outputs=[grpcclient.InferRequestedOutput(contract.RESIDENCY_OUTPUT.name)],
            parameters={contract.RESIDENCY_PARAMETER: action, KEY_NAME: self._key},
            client_timeout=self.load_timeout,
        )
        return dict(json.loads(result.as_numpy(contract.RESIDENCY_OUTPUT.name).reshape(-1)[0]))

    def ready(self, names: list[str]) -> dict[str, bool] | None:
        """Which of `names` are READY in the repository index; None while the server cannot say."""
        try:
            index = self._client().get_model_repository_index(
                as_json=True, headers=self._headers, client_timeout=INDEX_TIMEOUT_SECONDS
            )
            index = index.get("models", [])
        except Exception:
            return None
        ready = {m["name"] for m in index if m.get("state") == "READY"}
        return {name: name in ready for name in names}
