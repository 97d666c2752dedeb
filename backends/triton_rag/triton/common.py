"""Glue between Triton's python backend and our plain-data code: model parameters, string inputs, errors, BLS."""

from __future__ import annotations

import json
import logging
import secrets
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_rag.core.admin import KEY_NAME, server_key
from triton_rag.core.errors import RequestError, client_message
from triton_rag.core.text import InputError, decode_utf8

T = TypeVar("T")
Row = TypeVar("Row")


class ComputeError(RuntimeError):
    """A compute model failed or is unavailable; every request that needed it gets this message."""


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def read_strings(request: Any, name: str, optional: bool = False) -> list[str] | None:
    """A [rows, 1] string input as Python strings (None when an optional input is absent)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if optional:
            return None
        raise InputError(f"missing input {name}")
    return decode_utf8(tensor.as_numpy().reshape(-1).tolist(), name)


def error_response(message: str, invalid_input: bool = True) -> Any:
    code = pb_utils.TritonError.INVALID_ARG if invalid_input else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def failure_response(error: BaseException, log: logging.LoggerAdapter | logging.Logger | None = None) -> Any:  # type: ignore[type-arg]
    """The one place an exception becomes a client's error: a RequestError (core/errors.py) with its own status
    code and message; anything else is INTERNAL with a reference to the log line that holds its traceback (never a
    repr or a traceback to the client)."""
    reference = ""
    if not isinstance(error, RequestError):
        reference = secrets.token_hex(4)
        (log or logging.getLogger(__name__)).error("internal error %s", reference, exc_info=error)
    code = getattr(pb_utils.TritonError, error.status if isinstance(error, RequestError) else "INTERNAL")
    message = client_message(error, reference)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def execute_jointly(
    requests: list[Any],
    parse: Callable[[Any], Sequence[Any]],
    compute: Callable[[list[Row]], Any],
    respond: Callable[[Sequence[Row], Any], Any],
    prepare: Callable[[list[Sequence[Any]]], list[Sequence[Row] | InputError]] | None = None,
) -> list[Any]:
    """The endpoints' execute(): parse every request into rows (a bad request gets its own INVALID_ARG error),
    optionally `prepare` the parsed rows of all good requests in one go (tokenization: one call for the batch; it
    returns each request's rows or its own error), one `compute` over the good rows of all requests together (a
    sequence or array, one result per row), then one response per request from its share of the results. A compute
    failure fails the requests that needed it; nothing takes the model down."""
    responses: list[Any] = [None] * len(requests)
    jobs: list[tuple[int, Sequence[Any]]] = []
    for index, request in enumerate(requests):
        try:
            rows = parse(request)
            if not rows:
                raise InputError("the request has no rows")
            jobs.append((index, rows))
        except InputError as exc:
            responses[index] = error_response(str(exc))
        except Exception as exc:
            traceback.print_exc()
            responses[index] = error_response(f"internal error: {exc!r}", invalid_input=False)
    if jobs and prepare is not None:
        try:
            prepared = prepare([rows for _, rows in jobs])
        except Exception as exc:
            traceback.print_exc()
            for index, _ in jobs:
                responses[index] = error_response(f"internal error: {exc!r}", invalid_input=False)
            return responses
        kept = []
        for (index, _), result in zip(jobs, prepared, strict=True):
            if isinstance(result, InputError):
                responses[index] = error_response(str(result))
            else:
                kept.append((index, result))
        jobs = kept
    if not jobs:
        return responses
    try:
        results = compute([row for _, rows in jobs for row in rows])
    except Exception as exc:
        if not isinstance(exc, ComputeError):
            traceback.print_exc()
        message = str(exc) if isinstance(exc, ComputeError) else f"internal error: {exc!r}"
        for index, _ in jobs:
            responses[index] = error_response(message, invalid_input=False)
        return responses
    offset = 0
    for index, rows in jobs:
        try:
            responses[index] = respond(rows, results[offset : offset + len(rows)])
        except Exception as exc:
            traceback.print_exc()
            responses[index] = error_response(f"internal error: {exc!r}", invalid_input=False)
        offset += len(rows)
    return responses


def answer_each(requests: list[Any], compute: Callable[[Any], list[Any]], failure: str) -> list[Any]:
    """The compute models' execute(): one response per request from its output tensors. A ValueError is the
    request's own bad input; anything else (out of memory, say) is reported and the model keeps serving."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=compute(request)))
        except ValueError as exc:
            responses.append(error_response(str(exc)))
        except Exception as exc:
            traceback.print_exc()
            responses.append(error_response(f"{failure}: {exc!r}", invalid_input=False))
    return responses


def call_model(
    model_name: str,
    inputs: dict[str, np.ndarray],
    outputs: list[str],
    parameters: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """One BLS request; the seam where the router (load-before-call) sits between endpoints and compute models."""
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=outputs,
        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        parameters=parameters or {},
    )
    response = request.exec()
    if response.has_error():
        raise ComputeError(f"{model_name}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


#: Words in Triton's BLS error when the target model is not loaded (unloaded behind the router's back).
_NOT_LOADED = ("is not found", "unknown model", "is not ready", "no available versions")


def is_not_loaded(error: ComputeError) -> bool:
    return any(phrase in str(error).lower() for phrase in _NOT_LOADED)


class RouterClient:
    """Leases from the `router` model around compute calls: load-before-call without the client's help.

    With no router configured (router disabled, every compute model loaded at start-up) leases are no-ops."""

    def __init__(self, router: str) -> None:
        self.router = router
        self._key: dict[str, str] | None = None

    def _parameters(self) -> dict[str, str]:
        """The admin key as a request parameter (ACQUIRE needs it); read once, on first use."""
        if self._key is None:
            self._key = {KEY_NAME: server_key()}
        return self._key

    def _call(self, action: str, models: tuple[str, ...] = (), lease: int | None = None) -> dict[str, np.ndarray]:
        inputs = {"ACTION": np.array([action.encode()], dtype=np.object_)}
        if models:
            inputs["MODELS"] = np.array([m.encode() for m in models], dtype=np.object_)
        if lease is not None:
            inputs["LEASE"] = np.array([lease], dtype=np.int64)
        return call_model(self.router, inputs, ["LEASE"] if action == "ACQUIRE" else [], self._parameters())

    @contextmanager
    def lease(self, model: str) -> Iterator[None]:
        if not self.router:
            yield
            return
        lease = int(self._call("ACQUIRE", (model,))["LEASE"][0])
        try:
            yield
        finally:
            try:
                self._call("RELEASE", lease=lease)
            except ComputeError as exc:  # the result stands; the router takes the lease back after its timeout
                print(f"could not release lease {lease} on {model}: {exc}", flush=True)

    def reconcile(self) -> None:
        if self.router:
            self._call("RECONCILE")

    def run(self, model: str, work: Callable[[], T]) -> T:
        """`work` (compute calls to `model`) under a lease; once more if the model vanished meanwhile (unloaded
        behind the router's back: the router reconciles, then loads it again)."""
        try:
            with self.lease(model):
                return work()
        except ComputeError as exc:
            if not (self.router and is_not_loaded(exc)):
                raise
        self.reconcile()
        with self.lease(model):
            return work()
