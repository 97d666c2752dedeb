"""A small tritonclient wrapper for the `router` model: what a client needs to read or steer residency explicitly.

Nothing here is required to use the endpoints (the router works without the client's help); it saves building the
ACTION/MODELS/LEASE tensors by hand. docs/ROUTER.md describes the actions.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from triton_rag import contract


class RouterControl:
    def __init__(self, url: str = "localhost:8001", router: str = contract.ROUTER) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.router = router

    def call(self, action: str, models: list[str] | None = None, lease: int | None = None) -> Any:
        """One router request; raises tritonclient's InferenceServerException with the router's message."""
        values: dict[str, np.ndarray] = {"ACTION": np.array([action.encode()], dtype=np.object_)}
        if models is not None:
            values["MODELS"] = np.array([m.encode() for m in models], dtype=np.object_)
        if lease is not None:
            values["LEASE"] = np.array([lease], dtype=np.int64)
        inputs = []
        for name, value in values.items():
            tensor = grpcclient.InferInput(name, list(value.shape), "BYTES" if value.dtype == np.object_ else "INT64")
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return self.client.infer(self.router, inputs)

    def _ledger(self, action: str, models: list[str] | None = None) -> dict[str, Any]:
        return json.loads(self.call(action, models).as_numpy("STATUS")[0])

    def status(self) -> dict[str, Any]:
        return self._ledger("STATUS")

    def pin(self, model: str) -> dict[str, Any]:
        """Load `model` if needed and keep it resident until `unpin`."""
        return self._ledger("PIN", [model])

    def unpin(self, model: str) -> dict[str, Any]:
        return self._ledger("UNPIN", [model])

    def plan(self, models: list[str]) -> dict[str, Any]:
        """The models (or endpoints) a pipeline is about to use, in order; an empty list clears the plan."""
        return self._ledger("PLAN", models)

    def reconcile(self) -> dict[str, Any]:
        return self._ledger("RECONCILE")

    def acquire(self, model: str) -> int:
        """A lease on `model` (resident until released), for clients that call a compute model directly."""
        return int(self.call("ACQUIRE", [model]).as_numpy("LEASE")[0])

    def release(self, lease: int) -> None:
        self.call("RELEASE", lease=lease)

    def set_budget(self, budget: int | str) -> None:
        """Change the budget at run time: reload the router with a config override (Triton's repository API)."""
        config = self.client.get_model_config(self.router, as_json=True)["config"]
        config["parameters"]["budget"] = {"string_value": str(budget)}
        self.client.load_model(self.router, config=json.dumps(config))
