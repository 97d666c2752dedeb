"""A small tritonclient wrapper for the `router` model: what a client needs to read or steer residency explicitly.

Nothing here is required to use the endpoints (the router works without the client's help); it saves building the
ACTION/MODELS/LEASE tensors by hand. docs/ROUTER.md describes the actions; the ones that change residency, and
Triton's repository API, need the admin key (README "Security").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from triton_rag import contract
from triton_rag.core import admin
from triton_rag.core.admin import GRPC_KEY_HEADER
from triton_rag.server import admin_key_file

#: `triton-rag serve`'s default --cache-dir, where it keeps the admin key it made
PROJECT_CACHE = Path(__file__).resolve().parents[2] / ".cache"


def default_key() -> str | None:
    """The key `triton-rag serve` uses by default: TRITON_RAG_ADMIN_KEY, else the project's `.cache/admin.key`.

    The file is found next to this checkout (`make install` installs it editable); a client on another machine, or
    with the package installed elsewhere, sets TRITON_RAG_ADMIN_KEY (`triton-rag admin-key` prints the value)."""
    configured = os.environ.get(admin.KEY_ENV, "").strip()
    if configured:
        return configured
    path = admin_key_file(PROJECT_CACHE)
    if not path.exists():
        return None
    return path.read_text().strip() or None


class AdminHeader(grpcclient.InferenceServerClientPlugin):
    """Sends the admin key in the header Triton's restricted gRPC APIs check, on every call of the gRPC client it is
    registered with (`client.register_plugin(AdminHeader(key))`)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, request: Any) -> None:
        request.headers[GRPC_KEY_HEADER] = self.key


class RouterControl:
    def __init__(self, url: str = "localhost:8001", router: str = contract.ROUTER, key: str | None = None) -> None:
        """`key`: the admin key, for PIN/UNPIN/PLAN/RECONCILE/ACQUIRE and the repository API (`set_budget`);
        by default `default_key()`. STATUS and RELEASE work without it."""
        self.client = grpcclient.InferenceServerClient(url)
        self.router = router
        self.key = key if key is not None else default_key()
        if self.key:
            self.client.register_plugin(AdminHeader(self.key))

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
        # the router reads the key from the request's parameters (Triton's header check covers its own APIs only)
        parameters = {admin.KEY_NAME: self.key} if self.key else None
        return self.client.infer(self.router, inputs, parameters=parameters)

    def _ledger(self, action: str, models: list[str] | None = None) -> dict[str, Any]:
        return json.loads(self.call(action, models).as_numpy("STATUS")[0])

    def status(self) -> dict[str, Any]:
        return self._ledger("STATUS")

    def wedged(self) -> dict[str, str]:
        """The models tritonserver cannot load again until it restarts (a stub that died before its first message:
        python_backend #408), each with the router's reason; {} when none is, or when there is no router."""
        try:
            models = self.status()["models"]
        except InferenceServerException:
            return {}
        return {name: row["wedged"] for name, row in models.items() if row.get("wedged")}

    def stop(self) -> bool:
        """STOP: the server is shutting down, so the router refuses every waiting and later ACQUIRE/PIN (the
        endpoints' requests end with UNAVAILABLE instead of waiting for a load). False when there is no router to
        tell (not loaded, or the server no longer answers)."""
        try:
            self._ledger("STOP")
        except InferenceServerException:
            return False
        return True

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
