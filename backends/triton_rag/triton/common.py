"""Glue between Triton's python backend and our plain-data code: model parameters, string inputs, errors, BLS."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_rag.core.admin import KEY_NAME, server_key
from triton_rag.core.errors import (
    UNAVAILABLE_CODES,
    BadInput,
    Internal,
    RequestError,
    StatusCode,
    Unavailable,
    client_message,
    from_model,
)
from triton_rag.core.logs import Logger, model_logger
from triton_rag.core.text import InputError, decode_utf8

T = TypeVar("T")
Row = TypeVar("Row")

#: The log of this stub's model, the default of the helpers below: `stub_logger` sets it from initialize() (a stub
#: process serves one model, so its lines carry that model's name).
_log: Logger = logging.getLogger(__name__)

#: pb_utils.TritonError's codes by name.
_CODES = "UNKNOWN INTERNAL NOT_FOUND INVALID_ARG UNAVAILABLE UNSUPPORTED ALREADY_EXISTS CANCELLED".split()


def stub_logger(args: Mapping[str, str]) -> Logger:
    """The model's logger (`<model>: ...` lines on stdout: the server log), for its initialize(); the helpers of
    this module log with it too."""
    global _log
    _log = model_logger(args["model_name"])
    return _log


def code_name(code: Any) -> str:
    """A pb_utils.TritonError code's name (INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, ...)."""
    return next((name for name in _CODES if getattr(pb_utils.TritonError, name, None) == code), "UNKNOWN")


def answer_code(model_name: str, error: Any) -> str:
    """The code of a BLS answer's error (a pb_utils.TritonError) from `model_name`, by name. Triton 2.51 hands a
    BLS caller every error as INTERNAL, whatever code the model answered with (triton-inference-server/server#7804),
    and answers a request to a model that is not loaded (never loaded, unloaded, not in the repository) with
    INTERNAL too ("Model 'x' is not ready"), so an INTERNAL answer from a model that Triton says is not ready is
    UNAVAILABLE: Triton's state decides, not words. A server that cannot even answer that question is stopping:
    UNAVAILABLE too. Where a later Triton keeps the codes, they pass through."""
    code = code_name(error.code())
    if code != "INTERNAL":
        return code
    try:
        ready = pb_utils.is_model_ready(model_name)
    except pb_utils.TritonModelException:  # "Server not ready": it is shutting down, and so is every model in it
        return "UNAVAILABLE"
    return code if ready else "UNAVAILABLE"


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def read_strings(
    request: Any, name: str, optional: bool = False, max_bytes: int | None = None, cut: bool = False
) -> list[str] | None:
    """A [rows, 1] string input as Python strings (None when an optional input is absent); each value's bytes
    checked against `max_bytes` before it is decoded (`core.text.decode_utf8`)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if optional:
            return None
        raise InputError(f"missing input {name}")
    return decode_utf8(tensor.as_numpy().reshape(-1).tolist(), name, max_bytes, cut)


def _response(status: StatusCode, message: str) -> Any:
    code = getattr(pb_utils.TritonError, status)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def failure(error: BaseException, log: Logger | None = None) -> tuple[StatusCode, str]:
    """(status code, client message) for an exception; what the client is not told goes to the log. A RequestError
    keeps its code and message (an Internal one is logged too, without a traceback: it names the failure already);
    anything else is INTERNAL with a fresh reference, and the log line of that reference holds its traceback."""
    log = log or _log
    if isinstance(error, RequestError):
        if isinstance(error, Internal):
            log.warning("%s", error)
        return error.status, str(error)
    reference = secrets.token_hex(4)
    log.error("internal error %s: %s", reference, type(error).__name__, exc_info=error)
    return "INTERNAL", client_message(error, reference)


def failure_response(error: BaseException, log: Logger | None = None) -> Any:
    """The one place an exception becomes a client's error: a RequestError (core/errors.py) with its own status
    code and message; anything else is INTERNAL with a reference to the log line that holds its traceback (never a
    repr or a traceback to the client)."""
    return _response(*failure(error, log))


def _fail_all(responses: list[Any], jobs: list[tuple[int, Any]], error: BaseException, log: Logger | None) -> list[Any]:
    """Every job's request fails with the same error (logged once)."""
    status, message = failure(error, log)
    for index, _ in jobs:
        responses[index] = _response(status, message)
    return responses


def execute_jointly(
    requests: list[Any],
    parse: Callable[[Any], Sequence[Any]],
    compute: Callable[[list[Row]], Any],
    respond: Callable[[Sequence[Row], Any], Any],
    prepare: Callable[[list[Sequence[Any]]], Sequence[Sequence[Row] | RequestError]] | None = None,
    log: Logger | None = None,
) -> list[Any]:
    """The endpoints' execute(): parse every request into rows (a bad request gets its own error), optionally
    `prepare` the parsed rows of all good requests in one go (tokenization: one call for the batch; it returns each
    request's rows or its own error), one `compute` over the good rows of all requests together (a sequence or
    array, one result per row), then one response per request from its share of the results. A compute failure
    fails the requests that needed it, with its own code (failure_response); nothing takes the model down."""
    responses: list[Any] = [None] * len(requests)
    jobs: list[tuple[int, Sequence[Any]]] = []
    for index, request in enumerate(requests):
        try:
            rows = parse(request)
            if not rows:
                raise BadInput("the request has no rows")
            jobs.append((index, rows))
        except Exception as exc:
            responses[index] = failure_response(exc, log)
    if jobs and prepare is not None:
        try:
            prepared = prepare([rows for _, rows in jobs])
        except Exception as exc:
            return _fail_all(responses, jobs, exc, log)
        kept = []
        for (index, _), result in zip(jobs, prepared, strict=True):
            if isinstance(result, RequestError):
                responses[index] = failure_response(result, log)
            else:
                kept.append((index, result))
        jobs = kept
    if not jobs:
        return responses
    try:
        results = compute([row for _, rows in jobs for row in rows])
    except Exception as exc:
        return _fail_all(responses, jobs, exc, log)
    offset = 0
    for index, rows in jobs:
        try:
            responses[index] = respond(rows, results[offset : offset + len(rows)])
        except Exception as exc:
            responses[index] = failure_response(exc, log)
        offset += len(rows)
    return responses


def answer_each(requests: list[Any], compute: Callable[[Any], list[Any]], log: Logger | None = None) -> list[Any]:
    """The compute models' execute(): one response per request from its output tensors. A ValueError is the
    request's own bad input (INVALID_ARG); a RequestError keeps its code; anything else (out of memory, say) is
    INTERNAL with a log reference, and the model keeps serving."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=compute(request)))
        except RequestError as exc:
            responses.append(failure_response(exc, log))
        except ValueError as exc:
            responses.append(failure_response(BadInput(str(exc)), log))
        except Exception as exc:
            responses.append(failure_response(exc, log))
    return responses


def call_model(
    model_name: str,
    inputs: dict[str, np.ndarray],
    outputs: list[str],
    parameters: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """One BLS request; the seam where the router (load-before-call) sits between endpoints and compute models. An
    error answer raises the error class of its code (core.errors.from_model: INVALID_ARG -> BadInput, NOT_FOUND or
    UNAVAILABLE -> Unavailable, else Internal), with `.model` and `.code` saying who answered what."""
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=outputs,
        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        parameters=parameters or {},
    )
    response = request.exec()
    if response.has_error():
        raise from_model(model_name, answer_code(model_name, response.error()), response.error().message())
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def vanished(error: RequestError, model: str) -> bool:
    """Whether a call to `model` failed because the model cannot be had (not loaded: unloaded behind the router's
    back), by the code of its answer (call_model), not by its words."""
    return error.model == model and error.code in UNAVAILABLE_CODES


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
        try:
            lease = int(self._call("ACQUIRE", (model,))["LEASE"][0])
        except RequestError as exc:
            # The router refuses an ACQUIRE only when the model cannot be had (a failed load, a model that cannot
            # fit, its queue timeout, a stop): UNAVAILABLE. Its own code does not survive BLS on Triton 2.51 (every
            # BLS error arrives as INTERNAL: triton-inference-server/server#7804), so the router's contract says it.
            raise Unavailable(str(exc)) from None
        try:
            yield
        finally:
            try:
                self._call("RELEASE", lease=lease)
            except RequestError as exc:  # the result stands; the router takes the lease back after its timeout
                _log.warning("could not release lease %s on %s: %s", lease, model, exc)

    def reconcile(self) -> None:
        if self.router:
            self._call("RECONCILE")

    def run(self, model: str, work: Callable[[], T]) -> T:
        """`work` (compute calls to `model`) under a lease; once more if the model vanished meanwhile (unloaded
        behind the router's back: the router reconciles, then loads it again)."""
        try:
            with self.lease(model):
                return work()
        except RequestError as exc:
            if not (self.router and vanished(exc, model)):
                raise
            _log.info("%s was not loaded (%s); the router reconciles and loads it again", model, exc.code)
        self.reconcile()
        with self.lease(model):
            return work()
