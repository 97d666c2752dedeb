"""The errors a gateway request can end with, and each API's error shape.

Routes raise `GatewayError` subclasses with a message fit for the client (what was wrong, which input, what to do).
`error_body` renders one in the shape of the API the route speaks: OpenAI's `{"error": {"message", "type", "param",
"code"}}`, Cohere's `{"message"}`, docling-serve's (FastAPI's) `{"detail"}`. Anything else that escapes a route is a
bug: the client gets a 500 with a reference to the gateway's log line, never a traceback or a repr.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

#: Which API's error shape a route answers in.
Style = Literal["openai", "cohere", "docling"]


class GatewayError(Exception):
    """Base of the tree: the message is safe to show the client."""

    status: ClassVar[int] = 500
    #: OpenAI's error `type`.
    kind: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(GatewayError):
    """The request is wrong: a bad field, an input over a limit (the message names its index)."""

    status = 400
    kind = "invalid_request_error"


class Unauthorized(GatewayError):
    """No API key, or not one of the configured keys."""

    status = 401
    kind = "invalid_request_error"
    default_code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(GatewayError):
    """Turned off by the deployment (an `http` source while allow_http_sources is false)."""

    status = 403
    kind = "invalid_request_error"


class NotFound(GatewayError):
    """A model this deployment does not serve."""

    status = 404
    kind = "invalid_request_error"
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    """A JSON API route asked with another method than POST."""

    status = 405
    kind = "invalid_request_error"
    default_code = "method_not_allowed"

    def headers(self) -> dict[str, str]:
        return {"Allow": "POST"}


class PayloadTooLarge(GatewayError):
    status = 413
    kind = "invalid_request_error"
    default_code = "request_too_large"


class Unprocessable(GatewayError):
    """A well-formed request asking for something this server does not do (an unsupported option)."""

    status = 422
    kind = "invalid_request_error"
    default_code = "unsupported_option"


class Unavailable(GatewayError):
    """Triton cannot answer now (not running, not ready, a model still loading past the deadline): retry later."""

    status = 503
    kind = "server_error"
    default_code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Internal(GatewayError):
    """A failure of ours or of a model: the message says where the details are, never what the traceback says."""

    status = 500
    kind = "server_error"
    default_code = "internal_error"


def error_body(error: GatewayError, style: Style) -> dict[str, Any]:
    """The JSON body of `error` as the API of `style` writes its errors."""
    if style == "openai":
        return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    if style == "cohere":
        return {"message": error.message}
    return {"detail": error.message}


def style_of(path: str) -> Style:
    """The API a path belongs to (for errors raised before a route runs: the body limit, the key check)."""
    if path.startswith(("/v1/rerank", "/v2/rerank")):
        return "cohere"
    if path.startswith("/v1/convert"):
        return "docling"
    return "openai"
