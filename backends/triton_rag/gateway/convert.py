"""docling-serve's `POST /v1/convert/file` and `POST /v1/convert/source`: the options this server honours or refuses
(pure), the source's bytes and kind, the Triton call (PDFs to `docling_document`, page images to `docling`) and the
response in docling-serve's shape (`document.{filename, md_content, json_content, html_content, text_content,
doctags_content}`, `status`, `errors`, `processing_time`, `timings`).

Options: `to_formats` (md, json, text, doctags, html: docling-core's exports), `from_formats` (which kinds of input
may convert), `image_export_mode` (embedded or placeholder), `md_page_break_placeholder`, `abort_on_error`,
`document_timeout`, `include_images` are honoured. Options that configure docling-serve's own pipelines (OCR engines,
table models, enrichments, backends) are accepted at docling-serve's default values, which ask for nothing beyond
what the VLM pipeline here does, and refused with 422 at any other value; unknown options are refused too. Nothing
given is ignored in silence.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from triton_rag.gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    Internal,
    PayloadTooLarge,
    Unprocessable,
)
from triton_rag.gateway.triton import TritonShell

#: to_formats value -> the response field it fills (docling-core's exports).
FORMATS: dict[str, str] = {
    "md": "md_content",
    "json": "json_content",
    "html": "html_content",
    "text": "text_content",
    "doctags": "doctags_content",
}
IMAGE_MODES = ("embedded", "placeholder")
#: Options honoured here, with docling-serve's defaults.
HONOURED: dict[str, Any] = {
    "to_formats": ["md"],
    "from_formats": None,  # default: every format
    "image_export_mode": "embedded",
    "md_page_break_placeholder": "",
    "abort_on_error": False,
    "document_timeout": None,
    "include_images": True,  # our documents carry no picture bitmaps either way
}
#: Options of docling-serve's own pipelines, accepted at the values its releases use as defaults (they ask for
#: nothing beyond the VLM pipeline here); any other value is refused.
DEFAULTS_ONLY: dict[str, tuple[Any, ...]] = {
    "pipeline": ("standard", "vlm"),
    "do_ocr": (True,),
    "force_ocr": (False,),
    "ocr_engine": ("auto", "easyocr"),
    "ocr_lang": (None, []),
    "pdf_backend": ("dlparse_v4", "dlparse_v2"),
    "table_mode": ("accurate", "fast"),
    "table_cell_matching": (True,),
    "do_table_structure": (True,),
    "page_range": ([1, sys.maxsize],),
    "images_scale": (2.0,),
    "return_as_file": (False,),
    "do_code_enrichment": (False,),
    "do_formula_enrichment": (False,),
    "do_picture_classification": (False,),
    "do_chart_extraction": (False,),
    "do_picture_description": (False,),
    "picture_description_area_threshold": (0.05,),
    "picture_description_local": (None,),
    "picture_description_api": (None,),
    "vlm_pipeline_model": (None,),
    "vlm_pipeline_model_local": (None,),
    "vlm_pipeline_model_api": (None,),
}
LIST_OPTIONS = frozenset({"to_formats", "from_formats", "ocr_lang", "page_range"})
BOOL_OPTIONS = frozenset(
    name
    for name, values in {**DEFAULTS_ONLY, **{k: (v,) for k, v in HONOURED.items()}}.items()
    if values and isinstance(values[0], bool)
)
FLOAT_OPTIONS = frozenset({"document_timeout", "images_scale", "picture_description_area_threshold"})
#: Form fields of /v1/convert/file that are not conversion options.
FORM_FIELDS = frozenset({"files", "target_type"})

Status = Literal["success", "partial_success", "failure"]


@dataclass(frozen=True)
class ConvertOptions:
    to_formats: tuple[str, ...] = ("md",)
    from_formats: tuple[str, ...] | None = None
    image_mode: str = "embedded"
    page_break: str = ""
    abort_on_error: bool = False
    timeout: float | None = None


def _render(value: Any) -> str:
    return "true" if value is True else "false" if value is False else "null" if value is None else repr(value)


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def convert_options(raw: dict[str, Any]) -> ConvertOptions:
    """The options of a request; Unprocessable (422) naming every option refused and what is accepted."""
    refused: list[str] = []
    for name, value in raw.items():
        if name in HONOURED:
            continue
        if name not in DEFAULTS_ONLY:
            refused.append(f"{name} (not an option this server knows)")
        elif value not in DEFAULTS_ONLY[name]:
            accepted = " or ".join(_render(v) for v in DEFAULTS_ONLY[name])
            refused.append(
                f"{name}={_render(value)} (this server runs granite-docling's VLM pipeline; accepted: {accepted})"
            )
    to_formats = [str(v) for v in _listed(raw.get("to_formats", HONOURED["to_formats"]))]
    unknown_formats = [f for f in to_formats if f not in FORMATS]
    if unknown_formats:
        refused.append(f"to_formats={','.join(unknown_formats)} (exported here: {', '.join(FORMATS)})")
    image_mode = str(raw.get("image_export_mode", HONOURED["image_export_mode"]))
    if image_mode not in IMAGE_MODES:
        refused.append(f"image_export_mode={image_mode} (accepted: {' or '.join(IMAGE_MODES)})")
    timeout = raw.get("document_timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0):
        refused.append(f"document_timeout={_render(timeout)} (a positive number of seconds)")
    for name in ("abort_on_error", "include_images"):
        if name in raw and not isinstance(raw[name], bool):
            refused.append(f"{name}={_render(raw[name])} (true or false)")
    if refused:
        raise Unprocessable("unsupported options: " + "; ".join(refused), param=refused[0].split("=")[0].split()[0])
    from_formats = raw.get("from_formats")
    return ConvertOptions(
        to_formats=tuple(dict.fromkeys(to_formats)) or ("md",),
        from_formats=None if from_formats is None else tuple(str(v) for v in _listed(from_formats)),
        image_mode=image_mode,
        page_break=str(raw.get("md_page_break_placeholder") or ""),
        abort_on_error=bool(raw.get("abort_on_error", False)),
        timeout=float(timeout) if timeout is not None else None,
    )


def _form_value(name: str, text: str) -> Any:
    lowered = text.strip().lower()
    if name in BOOL_OPTIONS and lowered in ("true", "false"):
        return lowered == "true"
    if name in FLOAT_OPTIONS:
        try:
            return float(text)
        except ValueError:
            return text
    if name == "page_range":
        try:
            return int(text)
        except ValueError:
            return text
    if lowered in ("null", "none") and name not in ("md_page_break_placeholder",):
        return None
    return text


def form_options(items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """docling-serve's form fields as options: a list option may repeat or be comma-separated; true/false and
    numbers become their values; the file fields are left out."""
    options: dict[str, Any] = {}
    for name, text in items:
        if name in FORM_FIELDS:
            continue
        if name in LIST_OPTIONS:
            parts = [part.strip() for part in text.split(",") if part.strip()]
            options.setdefault(name, []).extend(_form_value(name, part) for part in parts)
        else:
            options[name] = _form_value(name, text)
    return options


def detect_kind(data: bytes) -> Literal["pdf", "image"] | None:
    """A PDF or a page image by its leading bytes (what Pillow and pypdfium2 read); None otherwise."""
    if data[:1024].lstrip().startswith(b"%PDF-"):
        return "pdf"
    signatures = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF87a", b"GIF89a")
    if data.startswith(signatures) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return "image"
    return None


@dataclass(frozen=True)
class Source:
    filename: str
    data: bytes


def decode_file_source(entry: dict[str, Any]) -> Source:
    """docling-serve's `{"kind": "file", "base64_string", "filename"}`."""
    try:
        data = base64.b64decode(str(entry.get("base64_string", "")), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("sources[0].base64_string is not valid base64") from None
    if not data:
        raise BadRequest("sources[0].base64_string is empty")
    return Source(str(entry.get("filename") or "document"), data)


def error_item(module: str, message: str, component: str = "model") -> dict[str, str]:
    """docling's ErrorItem."""
    return {"component_type": component, "module_name": module, "error_message": message}


def export(document_json: str, filename: str, options: ConvertOptions) -> dict[str, Any]:
    """docling-serve's `document`: each asked-for format exported by docling-core from the DoclingDocument."""
    from docling_core.types.doc import DoclingDocument, ImageRefMode

    document = DoclingDocument.model_validate_json(document_json)
    document.name = Path(filename).stem or document.name
    mode = ImageRefMode(options.image_mode)
    content: dict[str, Any] = {"filename": filename, **{field: None for field in FORMATS.values()}}
    for fmt in options.to_formats:
        if fmt == "md":
            content["md_content"] = document.export_to_markdown(
                image_mode=mode, page_break_placeholder=options.page_break or None
            )
        elif fmt == "json":
            content["json_content"] = document.export_to_dict()
        elif fmt == "html":
            content["html_content"] = document.export_to_html(image_mode=mode)
        elif fmt == "text":
            content["text_content"] = document.export_to_text()
        elif fmt == "doctags":
            content["doctags_content"] = document.export_to_doctags()
    return content


def response_body(
    filename: str, content: dict[str, Any] | None, status: Status, errors: list[dict[str, str]], seconds: float
) -> dict[str, Any]:
    document = content or {"filename": filename, **{field: None for field in FORMATS.values()}}
    return {"document": document, "status": status, "errors": errors, "processing_time": seconds, "timings": {}}


async def convert(source: Source, options: ConvertOptions, shell: TritonShell) -> dict[str, Any]:
    """One source through Triton, as docling-serve's response. A document that cannot be converted is answered in
    the response (status failure, with the reason), as docling reports it; Triton unavailable is a 503."""
    started = time.monotonic()
    kind = detect_kind(source.data)

    def failed(module: str, message: str, component: str = "user_input") -> dict[str, Any]:
        errors = [error_item(module, message, component)]
        return response_body(source.filename, None, "failure", errors, time.monotonic() - started)

    if kind is None:
        return failed("gateway", f"{source.filename} is neither a PDF nor a page image (PNG, JPEG, TIFF, BMP, WebP)")
    if options.from_formats is not None and kind not in options.from_formats:
        return failed("gateway", f"{source.filename} is a {kind}, not one of from_formats {list(options.from_formats)}")
    module = "docling_document" if kind == "pdf" else "docling"
    errors: list[dict[str, str]] = []
    try:
        if kind == "pdf":
            document_json, page_errors = await shell.convert_pdf(source.data, options.timeout)
            for page, reason in sorted(json.loads(page_errors).items(), key=lambda item: int(item[0])):
                errors.append(error_item(module, f"page {page}: {reason}"))
        else:
            document_json, _ = await shell.convert_image(source.data, options.timeout)
    except (BadRequest, Internal) as exc:
        return failed(module, exc.message, "user_input" if isinstance(exc, BadRequest) else "model")
    if errors and options.abort_on_error:
        return response_body(source.filename, None, "failure", errors, time.monotonic() - started)
    content = export(document_json, source.filename, options)
    status: Status = "partial_success" if errors else "success"
    return response_body(source.filename, content, status, errors, time.monotonic() - started)


async def fetch_http_source(entry: dict[str, Any], allowed: bool, limit: int, timeout: float) -> Source:
    """docling-serve's `{"kind": "http", "url", "headers"}`: fetched by the gateway only where the deployment allows
    it ([gateway] allow_http_sources), at most `limit` bytes."""
    if not allowed:
        raise Forbidden(
            "http sources are turned off on this server (the gateway would fetch a URL on your behalf): send the "
            'file itself ({"kind": "file", "base64_string": ..., "filename": ...}, or POST /v1/convert/file), or '
            "enable [gateway] allow_http_sources"
        )
    url = str(entry.get("url", ""))
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise BadRequest(f"sources[0].url must be an http(s) URL, got {url!r}")
    headers = {str(k): str(v) for k, v in (entry.get("headers") or {}).items()}

    def fetch() -> bytes:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (enabled by the operator)
            data = bytes(response.read(limit + 1))
        if len(data) > limit:
            raise PayloadTooLarge(f"{url} is larger than the limit of {limit} bytes")
        return data

    try:
        data = await asyncio.to_thread(fetch)
    except GatewayError:
        raise
    except OSError as exc:
        raise BadRequest(f"could not fetch {url}: {exc}") from None
    name = Path(urllib.parse.urlsplit(url).path).name or "document"
    return Source(name, data)
