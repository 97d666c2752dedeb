"""PDF pages to images with pypdfium2, within documented limits, and page images from client bytes.

PDFium is not thread-safe, not even across documents (pypdfium2's docs), and a python model may run several
executes at once (instances are threads of one stub only in tests, but BLS and async executes overlap), so every
pdfium call holds one process-wide lock.
"""

from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass

from PIL import Image

from triton_rag.core.errors import BadInput, TooLarge
from triton_rag.core.limits import Limits as Limits  # the limits and their defaults live in core.limits

_PDFIUM_LOCK = threading.Lock()
_EMPTY_PAGE_TREE = re.compile(rb"/Type\s*/Pages\b[^>]*?/Count\s+0\b|/Count\s+0\b[^>]*?/Type\s*/Pages\b")
#: Pillow refuses images above this many pixels (decompression bombs); ours is explicit and configurable.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class RenderedPage:
    number: int  # 1-based
    image: Image.Image | None  # None when the page could not be rendered (`error` says why)
    size_points: tuple[float, float]  # width, height after /Rotate, in PDF points
    error: str = ""


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode one page image; refuses what is not an image or is larger than the limit, before decoding pixels."""
    if not data:
        raise BadInput("IMAGE is empty")
    if len(data) > limits.max_document_bytes:
        raise TooLarge(f"IMAGE has {len(data)} bytes, more than the limit of {limits.max_document_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:
        raise BadInput("IMAGE is not an image Pillow can read (PNG, JPEG, TIFF, BMP, WebP, ...)") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise TooLarge(
            f"IMAGE is {width}x{height} = {width * height} pixels, more than the limit of {limits.max_image_pixels}"
        )
    try:
        image.load()
    except Exception as exc:
        raise BadInput(f"IMAGE cannot be decoded: {exc}") from None
    return image


def _render_scale(size: tuple[float, float], limits: Limits) -> float:
    scale = limits.dpi / 72.0
    pixels = size[0] * scale * size[1] * scale
    if pixels > limits.max_image_pixels:  # a poster-sized page: render it smaller rather than refuse the document
        scale *= (limits.max_image_pixels / pixels) ** 0.5
    return scale


def render_pdf(data: bytes, limits: Limits) -> list[RenderedPage]:
    """Every page of a PDF as an RGB image; BadInput for what is not a PDF, is empty or encrypted, TooLarge for
    what is over a limit."""
    import pypdfium2 as pdfium

    if not data:
        raise BadInput("DOCUMENT is empty")
    if len(data) > limits.max_document_bytes:
        raise TooLarge(f"DOCUMENT has {len(data)} bytes, more than the limit of {limits.max_document_bytes}")
    with _PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            # PDFium refuses a well-formed PDF whose page tree is empty without setting its last error, so the
            # error code then belongs to an earlier failure: recognise an empty page tree by its declaration.
            if data.startswith(b"%PDF") and _EMPTY_PAGE_TREE.search(data):
                raise BadInput("DOCUMENT is a PDF with no pages") from None
            if getattr(exc, "err_code", None) == pdfium.raw.FPDF_ERR_PASSWORD:
                raise BadInput("DOCUMENT is an encrypted PDF (a password is needed)") from None
            raise BadInput(f"DOCUMENT is not a readable PDF ({exc})") from None
        try:
            count = len(document)
            if count == 0:
                raise BadInput("DOCUMENT is a PDF with no pages")
            if count > limits.max_pages:
                raise TooLarge(f"DOCUMENT has {count} pages, more than the limit of {limits.max_pages}")
            pages = []
            for index in range(count):
                pages.append(_render_page(document, index, limits))
            return pages
        finally:
            document.close()


def _render_page(document: object, index: int, limits: Limits) -> RenderedPage:
    """One page; a page PDFium cannot load or render is returned with its error, so the caller can report it."""
    size = (0.0, 0.0)
    try:
        page = document[index]  # type: ignore[index]
    except Exception as exc:
        return RenderedPage(index + 1, None, size, f"page {index + 1} cannot be loaded: {exc}")
    try:
        width, height = page.get_size()
        size = (float(width), float(height))
        image = page.render(scale=_render_scale(size, limits)).to_pil().convert("RGB")
        return RenderedPage(index + 1, image, size)
    except Exception as exc:
        return RenderedPage(index + 1, None, size, f"page {index + 1} cannot be rendered: {exc}")
    finally:
        page.close()
