"""The errors a request can end with: one small tree, each class carrying the Triton status code it maps to.

Code anywhere raises these with a message fit for the client (what was wrong and what to do); the Triton adapters
turn them into per-request errors in one place (`triton_rag.triton.common.error_response`). Anything else that
escapes is a bug: the client gets `Internal` with a reference, the traceback goes to the log, never to the client.
Triton's status codes (TRITONSERVER_Error_Code) have no "forbidden" or "too large": those map to INVALID_ARG, the
client's own mistake that a retry does not fix (HTTP 400, gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

from typing import ClassVar, Literal

#: The Triton status codes we answer with (pb_utils.TritonError's names).
StatusCode = Literal["INVALID_ARG", "UNAVAILABLE", "NOT_FOUND", "INTERNAL"]


class RequestError(Exception):
    """Base of the tree: the message is safe to show the client."""

    status: ClassVar[StatusCode] = "INTERNAL"


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
