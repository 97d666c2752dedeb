"""The gateway application: API keys, the body limit, metrics per route, each API's error shape, and the routes
(thin: the work is in `embeddings`, `rerank`, `convert`, the Triton calls in `triton`).

Routes: `POST /v1/embeddings` (OpenAI), `POST /v1/rerank` (Jina / Cohere v1), `POST /v2/rerank` (Cohere v2),
`POST /v1/convert/file` and `POST /v1/convert/source` (docling-serve), `GET /v1/models` (OpenAI), `GET /health`
(200 only when Triton is ready), `GET /metrics` (Prometheus). /health and /metrics need no key; the rest do when
keys are configured.

The layers, outermost first: `Guard` (metrics, key, body limit), `JsonApi` (the embeddings and rerank routes, the
gateway's hot path), FastAPI (every other route).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from triton_rag.build.settings import GatewaySettings
from triton_rag.gateway import convert as conversion
from triton_rag.gateway.catalog import OWNER, Catalog
from triton_rag.gateway.embeddings import EmbeddingRequest, create_embeddings
from triton_rag.gateway.errors import (
    BadRequest,
    GatewayError,
    Internal,
    MethodNotAllowed,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    Unprocessable,
    error_body,
    style_of,
)
from triton_rag.gateway.metrics import GatewayMetrics
from triton_rag.gateway.rerank import RerankRequest, Version, rerank
from triton_rag.gateway.triton import TritonShell

_log = logging.getLogger("triton_rag.gateway")


class JSONResponse(Response):
    """JSON by orjson: numpy rows as they are (an embedding is a long list of floats; float32 written in their
    shortest form), several times faster than the standard library's encoder."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


#: Routes without a key: a load balancer's probe and Prometheus.
OPEN_PATHS = frozenset({"/health", "/metrics"})


@dataclass(frozen=True)
class GatewayConfig:
    settings: GatewaySettings
    #: Every key a client may send (rag.toml's and the key file's); empty: no key asked for.
    api_keys: tuple[str, ...]
    catalog: Catalog
    #: Triton's gRPC endpoint, "host:port".
    triton_url: str
    #: prometheus_client's multiprocess directory when several worker processes serve (gateway.workers).
    metrics_dir: str | None = None


class BodyTooLarge(HTTPException):
    """Raised while the body is read: an HTTPException, so FastAPI's body parsing passes it on as it is."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


def _error_response(error: GatewayError, path: str) -> JSONResponse:
    return JSONResponse(error_body(error, style_of(path)), status_code=error.status, headers=error.headers())


def _gateway_error(error: GatewayError, path: str) -> JSONResponse:
    if isinstance(error, Unavailable):
        _log.info("%s: 503: %s", path, error.message)
    return _error_response(error, path)


def _invalid(errors: Sequence[Any], path: str) -> JSONResponse:
    message, param = _validation_message(errors)
    # docling-serve (FastAPI) answers a malformed request with 422; OpenAI and Cohere with 400
    problem: GatewayError = (
        Unprocessable(message, param=param, code="invalid_request")
        if style_of(path) == "docling"
        else BadRequest(message, param=param, code="invalid_request")
    )
    return _error_response(problem, path)


def _bug(error: Exception, path: str) -> JSONResponse:
    reference = secrets.token_hex(4)
    _log.error("%s: internal error, reference %s", path, reference, exc_info=error)
    problem = Internal(f"internal error (gateway log reference {reference}); the gateway's log has the details")
    return _error_response(problem, path)


class Guard:
    """Outermost ASGI layer: metrics per route, the API key and the body limit (Content-Length first, then the bytes
    as they arrive, so an oversized body is refused without being read)."""

    def __init__(self, app: ASGIApp, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.app = app
        self.keys = tuple(key.encode() for key in config.api_keys)
        self.limit = config.settings.body_limit()
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = token.strip()
                    # compare with every key (constant time each) so the time says nothing about which one matched
                    return sum(hmac.compare_digest(token, key) for key in self.keys) > 0
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        responded = [False]
        path = scope["path"]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                responded[0] = True
            await send(message)

        try:
            if not self._authorized(scope):
                has_header = any(name == b"authorization" for name, _ in scope.get("headers", ()))
                problem = "is not a valid key" if has_header else "is missing"
                error = Unauthorized(f"the API key {problem}: send it as 'Authorization: Bearer <key>'")
                await _error_response(error, path)(scope, receive, sending)
                return
            declared = dict(scope.get("headers", ())).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                await _error_response(self._too_large(int(declared)), path)(scope, receive, sending)
                return
            received = [0]

            async def receiving() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > self.limit:
                        raise BodyTooLarge
                return message

            try:
                await self.app(scope, receiving, sending)
            except BodyTooLarge:
                await _error_response(self._too_large(received[0]), path)(scope, receive, sending)
            except Exception:
                if not responded[0]:
                    raise
                # answered already (500 with a reference) and logged by the application's handler
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(label, status[0], time.perf_counter() - started)

    def _too_large(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is {'at least ' if size <= self.limit else ''}{size} bytes, more than the limit of "
            f"{self.limit} ([gateway] max_body_bytes)"
        )


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """pydantic's errors as one sentence (no input values echoed) and the first field's name."""
    parts, param = [], None
    for error in errors[:5]:
        location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query")]
        field = ".".join(location) or "body"
        param = param or (location[0] if location else None)
        if error.get("type") == "extra_forbidden":
            parts.append(f"{field}: not a field of this API (unrecognized request argument)")
        else:
            parts.append(f"{field}: {error.get('msg', 'invalid')}")
    return "; ".join(parts), param


@dataclass(frozen=True)
class JsonRoute:
    """`POST path`: the body validated as `request`, answered by `answer` (the response body)."""

    path: str
    request: type[BaseModel]
    answer: Callable[[Any], Awaitable[dict[str, Any]]]


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body (the Guard's `receive` counts it against the limit), or None if the client went away."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _json_body(scope: Scope, body: bytes) -> Any:
    """The body as FastAPI reads a JSON body: parsed when its Content-Type is absent or JSON (application/json,
    application/*+json), by the standard library's parser (which keeps a lone surrogate's escape, refused later
    with its own message)."""
    content_type = next((value for name, value in scope["headers"] if name == b"content-type"), b"")
    kind = content_type.partition(b";")[0].strip().lower()
    if kind and kind != b"application/json" and not (kind.startswith(b"application/") and kind.endswith(b"+json")):
        raise BadRequest(
            f"the body must be JSON (Content-Type: application/json), not {kind.decode('latin-1')}",
            code="invalid_request",
        )
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_request") from None


class JsonApi:
    """The JSON API routes (embeddings, rerank) answered here, in front of FastAPI, which serves every other path.
    The same pydantic models validate the same JSON, errors keep each API's shape and message; what is left out is
    FastAPI's routing, dependency solving and middleware stack, which cost more CPU per request than the route's
    own work, tokenization included (BENCHMARKS.md, "Gateway")."""

    def __init__(self, app: ASGIApp, routes: Sequence[JsonRoute]) -> None:
        self.app = app
        self.routes = {route.path: route for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # the Guard's metrics label, as FastAPI's router sets its own routes
        response = await self._respond(route, scope, receive)
        if response is not None:
            await response(scope, receive, send)

    async def _respond(self, route: JsonRoute, scope: Scope, receive: Receive) -> Response | None:
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{route.path} answers POST only")
            body = await _read_body(receive)
            if body is None:
                return None
            request = route.request.model_validate(_json_body(scope, body))
            return JSONResponse(await route.answer(request))
        except BodyTooLarge:
            raise  # the Guard answers it
        except ValidationError as error:
            return _invalid(error.errors(), route.path)
        except GatewayError as error:
            return _gateway_error(error, route.path)
        except Exception as error:
            return _bug(error, route.path)


def create_app(config: GatewayConfig, shell: TritonShell | None = None) -> ASGIApp:
    """What uvicorn serves: the Guard, the JSON API routes, FastAPI for the rest."""
    metrics = GatewayMetrics(config.metrics_dir)
    triton = shell or TritonShell(
        config.triton_url, config.settings.request_timeout_seconds, config.settings.retry_after_seconds, metrics
    )
    settings = config.settings
    catalog = config.catalog

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        await triton.close()

    app = FastAPI(
        title="triton-rag gateway",
        description="OpenAI embeddings, Cohere/Jina rerank and docling-serve conversion in front of Triton",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return _gateway_error(error, request.url.path)

    @app.exception_handler(BodyTooLarge)
    async def on_too_large(request: Request, _: BodyTooLarge) -> JSONResponse:
        limit = settings.body_limit()
        error = PayloadTooLarge(f"the request body is more than the limit of {limit} bytes ([gateway] max_body_bytes)")
        return _error_response(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _invalid(error.errors(), request.url.path)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> JSONResponse:
        return _bug(error, request.url.path)

    @app.get("/health")
    async def health() -> JSONResponse:
        if await triton.ready():
            return JSONResponse({"status": "ok"})
        error = Unavailable("Triton is not ready", retry_after=settings.retry_after_seconds)
        return JSONResponse(
            {"status": "unavailable", "detail": error.message}, status_code=503, headers=error.headers()
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        data = [
            {"id": name, "object": "model", "created": catalog.created, "owned_by": OWNER}
            for model in catalog.models()
            for name in model.ids[:1]
        ]
        return JSONResponse({"object": "list", "data": data})

    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        answer, count = await create_embeddings(body, catalog, triton, settings.max_inputs)
        metrics.inputs.labels("/v1/embeddings").inc(count)
        return answer

    def rerank_route(version: Version, path: str) -> JsonRoute:
        async def answer(body: RerankRequest) -> dict[str, Any]:
            result, count = await rerank(version, body, catalog, triton, settings.max_inputs)
            metrics.inputs.labels(path).inc(count)
            return result

        return JsonRoute(path, RerankRequest, answer)

    json_routes = [
        JsonRoute("/v1/embeddings", EmbeddingRequest, embeddings),
        rerank_route("v1", "/v1/rerank"),
        rerank_route("v2", "/v2/rerank"),
    ]

    @app.post("/v1/convert/file")
    async def convert_file(request: Request) -> JSONResponse:
        catalog.converter()
        form = await request.form()
        try:
            files = [value for value in form.getlist("files") if not isinstance(value, str)]
            if len(files) != 1:
                raise Unprocessable(
                    f"send one file per request as the form field 'files' (got {len(files)}); docling-serve answers "
                    "several with a zip file, which this server does not",
                    param="files",
                )
            if str(form.get("target_type", "inbody")) != "inbody":
                raise Unprocessable("target_type: only 'inbody' is served here", param="target_type")
            options = conversion.convert_options(
                conversion.form_options((k, v) for k, v in form.multi_items() if isinstance(v, str))
            )
            upload = files[0]
            source = conversion.Source(upload.filename or "document", await upload.read())
        finally:
            await form.close()
        answer = await conversion.convert(source, options, triton)
        metrics.inputs.labels("/v1/convert/file").inc()
        return JSONResponse(answer)

    @app.post("/v1/convert/source")
    async def convert_source(request: Request) -> JSONResponse:
        catalog.converter()
        try:
            body = await request.json()
        except ValueError:
            raise Unprocessable("the body is not JSON") from None
        if not isinstance(body, dict):
            raise Unprocessable("the body must be a JSON object with 'sources' (and 'options')")
        unknown = sorted(set(body) - {"sources", "options", "target", "file_sources", "http_sources"})
        if unknown:
            raise Unprocessable(f"unknown fields: {', '.join(unknown)}", param=unknown[0])
        sources = list(body.get("sources") or [])
        sources += [{"kind": "file", **item} for item in body.get("file_sources") or []]
        sources += [{"kind": "http", **item} for item in body.get("http_sources") or []]
        if len(sources) != 1 or not isinstance(sources[0], dict):
            raise Unprocessable(
                f"send one source per request (got {len(sources)}); docling-serve answers several with a zip file, "
                "which this server does not",
                param="sources",
            )
        target = body.get("target") or {"kind": "inbody"}
        if not isinstance(target, dict) or target.get("kind", "inbody") != "inbody":
            raise Unprocessable("target: only {'kind': 'inbody'} is served here", param="target")
        options_raw = body.get("options") or {}
        if not isinstance(options_raw, dict):
            raise Unprocessable("options must be a JSON object", param="options")
        options = conversion.convert_options(options_raw)
        entry = sources[0]
        kind = entry.get("kind", "file")
        if kind == "file":
            source = conversion.decode_file_source(entry)
        elif kind == "http":
            source = await conversion.fetch_http_source(
                entry, settings.allow_http_sources, settings.body_limit(), settings.request_timeout_seconds
            )
        else:
            raise Unprocessable(
                f"sources[0].kind {kind!r} is not served here (file, or http where enabled)", param="sources"
            )
        answer = await conversion.convert(source, options, triton)
        metrics.inputs.labels("/v1/convert/source").inc()
        return JSONResponse(answer)

    return Guard(JsonApi(app, json_routes), config, metrics)


__all__ = ["GatewayConfig", "create_app"]
