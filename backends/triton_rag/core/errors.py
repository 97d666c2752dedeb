"""The errors a request can end with: one small tree, each class carrying the Triton status code it maps to.

Code anywhere raises these with a message fit for the client (what was wrong and what to do); the Triton adapters
turn them into per-request errors in one place (`triton_rag.triton.common.failure_response`). Anything else that
escapes is a bug: the client gets `Internal` with a reference, the traceback goes to the log, never to the client.
An error another model answered with (a BLS call) becomes the class of its code (`from_model`), so the client of an
endpoint gets the compute model's code, not INTERNAL. (Triton 2.51 hands BLS callers every error as INTERNAL,
triton-inference-server/server#7804: there, a model that is not ready and the router's refusals are recognised by
Triton's state and the router's contract instead; triton/common.py.)
Triton's status codes (TRITONSERVER_Error_Code) have no "forbidden" or "too large": those map to INVALID_ARG, the
client's own mistake that a retry does not fix (HTTP 400, gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

from typing import ClassVar, Literal

#: The Triton status codes we answer with (pb_utils.TritonError's names).
StatusCode = Literal["INVALID_ARG", "UNAVAILABLE", "NOT_FOUND", "INTERNAL"]

#: The codes of a BLS answer that say the model called cannot be had now, rather than that the request is wrong
#: or that the model failed. Triton 2.51 itself answers a BLS request to a model that is not loaded with INTERNAL
#: ("Model 'x' is not ready"); triton.common.answer_code makes that UNAVAILABLE when Triton says the model is not
#: ready.
UNAVAILABLE_CODES = frozenset({"NOT_FOUND", "UNAVAILABLE", "CANCELLED"})


class RequestError(Exception):
    """Base of the tree: the message is safe to show the client."""

    status: ClassVar[StatusCode] = "INTERNAL"
    #: Set when another model answered with this error (a BLS call, `from_model`): that model and its Triton code.
    model: str = ""
    code: str = ""


class BadInput(RequestError, ValueError):
    """The request itself is wrong (missing tensor, bad UTF-8, empty text, too long, unknown action)."""

    status: ClassVar[StatusCode] = "INVALID_ARG"


class TooLarge(BadInput):
    """The request is over a configured limit (bytes, pages, pixels, tokens); checked before the work starts."""


class Forbidden(BadInput):
    """The request needs the admin key and did not carry it (Triton has no permission-denied code)."""


class Unavailable(RequestError):
    """What the request needs cannot be had now (a model that failed to load, a router that is stopping); a retry
    later may succeed."""

    status: ClassVar[StatusCode] = "UNAVAILABLE"


class TimedOut(Unavailable):
    """The request waited longer than its limit (the router's queue timeout, a load that did not finish)."""


class Internal(RequestError):
    """Our fault: the client gets this message, the log gets the traceback."""

    status: ClassVar[StatusCode] = "INTERNAL"


def client_message(error: BaseException, reference: str = "") -> str:
    """What the client is told: a RequestError's own message; for anything else no repr, no traceback, only a
    pointer to the server log (where the traceback went)."""
    if isinstance(error, RequestError):
        return str(error)
    where = f" (server log reference {reference})" if reference else ""
    return f"internal error{where}; the server log has the details"


def kind_of(code: str) -> type[RequestError]:
    """The class of our tree for a Triton status code: INVALID_ARG -> BadInput, UNAVAILABLE_CODES -> Unavailable,
    anything else -> Internal."""
    return BadInput if code == "INVALID_ARG" else Unavailable if code in UNAVAILABLE_CODES else Internal


def from_model(model: str, code: str, message: str) -> RequestError:
    """The error of a BLS call to `model` answered with Triton status `code` (a pb_utils.TritonError name) and
    `message`: the caller's request fails the same way. The request was wrong (INVALID_ARG) -> BadInput; the model
    cannot be had now (UNAVAILABLE_CODES) -> Unavailable; anything else -> Internal with the model's message (the
    model has already kept its own details in the log). `.model` and `.code` keep where it came from."""
    error = kind_of(code)(f"{model}: {message}")
    error.model, error.code = model, code
    return error
