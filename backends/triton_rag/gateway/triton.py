"""The gateway's only contact with Triton: async gRPC calls to the client-facing endpoints, split into requests the
endpoint accepts (at most its max_batch_size rows each) and sent concurrently, results back in order; Triton's
answers mapped to the gateway's errors (INVALID_ARGUMENT: 400; not running, not ready, past the deadline: 503 with
Retry-After; anything else: 500 with Triton's message, which never carries a traceback)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from triton_rag import contract
from triton_rag.gateway.errors import BadRequest, GatewayError, Internal, Unavailable
from triton_rag.gateway.metrics import GatewayMetrics

_log = logging.getLogger(__name__)

#: gRPC codes that say Triton cannot answer now (a retry later may succeed).
UNAVAILABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED", "NOT_FOUND"})


#: gRPC waits longer and longer between attempts to reconnect to a Triton it could not reach (up to 2 minutes), and
#: fails a request at once while it waits (503): after Triton's start (serve starts the gateway before Triton is
#: ready) or a restart, each worker's channel tries again at least every second.
RECONNECT_BACKOFF_MS = 1000


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel arguments (no message size limit; its keepalive options are gRPC's defaults), and
    the reconnection backoff capped at RECONNECT_BACKOFF_MS."""
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ]


#: Above this many texts a request's tokenization runs on a worker thread (the tokenizer releases the GIL), so a
#: large request does not hold up the event loop; below, a thread hop would cost more than the tokenization.
THREAD_ROWS = 16


async def count_off_loop(count: Callable[..., int], rows: int, *args: Any) -> int:
    """`count(*args)`, on a worker thread when it covers more than THREAD_ROWS rows."""
    if rows > THREAD_ROWS:
        return await asyncio.to_thread(count, *args)
    return count(*args)


def chunks(rows: int, max_batch: int) -> list[range]:
    """Row ranges of at most `max_batch` rows (0: one row each, the endpoint is not batched), in order."""
    size = max(1, max_batch)
    return [range(start, min(start + size, rows)) for start in range(0, rows, size)]


def grpc_code(error: InferenceServerException) -> str:
    """ "StatusCode.UNAVAILABLE" -> "UNAVAILABLE" ("" when the error carries none)."""
    return str(error.status() or "").rsplit(".", 1)[-1]


def map_error(
    error: InferenceServerException, model: str, rows: range | None, timeout: float, retry_after: int
) -> GatewayError:
    """Triton's answer as the gateway's error. `rows`: the request's rows this call carried, so that an error naming
    "row N" of the call names the request's input instead."""
    code = grpc_code(error)
    message = str(error.message() or "").strip()
    if code == "DEADLINE_EXCEEDED":
        return Unavailable(
            f"{model} did not answer within {timeout:g} s (a model may still be loading); retry later",
            retry_after=retry_after,
        )
    if code in UNAVAILABLE_CODES:
        detail = message if message and "failed to connect" not in message.lower() else "Triton is not reachable"
        return Unavailable(f"{model} is unavailable now: {detail}; retry later", retry_after=retry_after)
    if code == "INVALID_ARGUMENT":
        if rows is not None:
            message = re.sub(r"\brow (\d+)", lambda m: f"input {int(m.group(1)) + rows.start}", message)
        return BadRequest(message)
    return Internal(f"{model} failed: {message or 'no message'}")


def strings(name: str, values: Sequence[str] | Sequence[bytes]) -> grpcclient.InferInput:
    data = np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=np.object_)
    tensor = grpcclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def document(data: bytes) -> grpcclient.InferInput:
    """`docling_document`'s DOCUMENT: shape [1] (the model is not batched)."""
    tensor = grpcclient.InferInput("DOCUMENT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    return tensor


class TritonShell:
    """One async gRPC channel to the local Triton, shared by every request."""

    def __init__(self, url: str, timeout: float, retry_after: int, metrics: GatewayMetrics) -> None:
        self.url = url
        self.timeout = timeout
        self.retry_after = retry_after
        self.metrics = metrics
        self._client: grpcclient.InferenceServerClient | None = None

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:  # made on the event loop that uses it
            self._client = grpcclient.InferenceServerClient(self.url, channel_args=channel_args())
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready(client_timeout=2.0))
        except InferenceServerException:
            return False

    async def _infer(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        outputs: Sequence[str],
        rows: range | None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        limit = timeout or self.timeout
        try:
            result = await self.client.infer(
                model,
                inputs,
                outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
                client_timeout=limit,
            )
        except InferenceServerException as exc:
            error = map_error(exc, model, rows, limit, self.retry_after)
            self.metrics.triton_calls.labels(model, type(error).__name__.lower()).inc()
            if isinstance(error, Internal):
                _log.warning("Triton answered %s with %s: %s", model, grpc_code(exc) or "an error", exc.message())
            raise error from None
        self.metrics.triton_calls.labels(model, "ok").inc()
        return {name: result.as_numpy(name) for name in outputs}

    async def _rows(self, model: str, max_batch: int, columns: dict[str, Sequence[str]], output: str) -> np.ndarray:
        total = len(next(iter(columns.values())))
        calls = [
            self._infer(
                model,
                [strings(name, values[part.start : part.stop]) for name, values in columns.items()],
                [output],
                part,
            )
            for part in chunks(total, max_batch)
        ]
        if len(calls) == 1:  # most requests: awaited as it is, no task made and scheduled for it
            return (await calls[0])[output]
        answers = await asyncio.gather(*calls)
        return np.concatenate([answer[output] for answer in answers], axis=0)

    async def embed(self, model: str, max_batch: int, texts: Sequence[str], instruction: str) -> np.ndarray:
        """EMBEDDING rows of `texts`, in order (FP16 or FP32, as the endpoint serves them)."""
        columns: dict[str, Sequence[str]] = {"TEXT": texts}
        if instruction:
            columns["INSTRUCTION"] = [instruction] * len(texts)
        return await self._rows(model, max_batch, columns, "EMBEDDING")

    async def rerank(
        self, model: str, max_batch: int, query: str, documents: Sequence[str], instruction: str
    ) -> np.ndarray:
        """SCORE of each (query, document), in document order, shape [n]."""
        columns: dict[str, Sequence[str]] = {"QUERY": [query] * len(documents), "DOCUMENT": documents}
        if instruction:
            columns["INSTRUCTION"] = [instruction] * len(documents)
        return (await self._rows(model, max_batch, columns, "SCORE")).reshape(-1)

    async def convert_pdf(self, data: bytes, timeout: float | None = None) -> tuple[str, str]:
        """`docling_document`: the DoclingDocument JSON and the page errors' JSON of a PDF."""
        names = ("STRUCTURED_JSON", "PAGE_ERRORS")
        out = await self._infer(contract.DOCLING_DOCUMENT_ENDPOINT, [document(data)], names, None, timeout)
        return _text(out["STRUCTURED_JSON"]), _text(out["PAGE_ERRORS"])

    async def convert_image(self, data: bytes, timeout: float | None = None) -> tuple[str, str]:
        """`docling`: the DoclingDocument JSON and the DocTags of one page image."""
        names = ("STRUCTURED_JSON", "DOCTAGS")
        out = await self._infer(contract.DOCLING_ENDPOINT, [strings("IMAGE", [data])], names, None, timeout)
        return _text(out["STRUCTURED_JSON"]), _text(out["DOCTAGS"])


def _text(values: np.ndarray) -> str:
    value = values.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)
