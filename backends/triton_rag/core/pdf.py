"""PDF pages to images with pypdfium2, within documented limits, one page at a time, and page images from client
bytes.

PDFium is not thread-safe, not even across documents (pypdfium2's docs), and a python model may run several
executes at once (instances are threads of one stub only in tests, but BLS and async executes overlap), so every
pdfium call holds one process-wide lock.
"""

from __future__ import annotations

import io
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from triton_rag.core.errors import BadInput, TooLarge
from triton_rag.core.images import to_rgb
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
    """Decode one page image into RGB (`core.images.to_rgb`: any mode, the first frame); refuses what is not an
    image or is larger than the limit before decoding pixels."""
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
    return to_rgb(image)  # once, here: everything after works on (and answers from) this RGB image


def rendered_size(size: tuple[float, float], scale: float) -> tuple[int, int]:
    """The pixel size pypdfium2's `PdfPage.render(scale=...)` draws a page of `size` points at: each side
    `ceil(points * scale)`, the same float arithmetic (pypdfium2 4.x, `_helpers/page.py`)."""
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


def render_scale(size: tuple[float, float], limits: Limits) -> float:
    """The scale (pixels per point) to render a page of `size` points (width, height, after /Rotate) at: `dpi`, or,
    for a page that would be larger than `max_image_pixels` (a poster), the largest scale whose rendered size
    (`rendered_size`, sides rounded up) still fits the limit, so that `docling`'s pixel check never refuses it.

    The rendered area only grows with the scale and jumps where one side crosses a whole pixel, so the largest scale
    that fits puts one side exactly on a pixel boundary: for each side, the largest whole number of pixels whose
    scale keeps the area within the limit (a binary search below the continuous optimum); the larger of the two
    scales wins. The result is exact: one float step more and the page no longer fits."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"a page needs a positive size, got {width} x {height} points")
    limit = limits.max_image_pixels
    scale = limits.dpi / 72.0
    if _area(size, scale) <= limit:
        return scale
    ideal = math.sqrt(limit / (width * height))  # no scale above this fits: the area is at least (w s)(h s)
    best = 0.0
    for side in (width, height):
        # binary search over this side's pixels; the top is one above the continuous optimum (float rounding)
        low, high = 0, math.floor(side * ideal) + 1  # `low` pixels fit (0: none yet), more than `high` do not
        while low < high:
            middle = (low + high + 1) // 2
            if _area(size, _largest_scale_within(side, middle)) <= limit:
                low = middle
            else:
                high = middle - 1
        if low:
            best = max(best, _largest_scale_within(side, low))
    if best <= 0.0:  # not even 1 x 1 fits: only a limit below 1 pixel gets here
        raise TooLarge(f"no page fits the limit of {limit} pixels")
    return best


def _area(size: tuple[float, float], scale: float) -> int:
    width, height = rendered_size(size, scale)
    return width * height


def _largest_scale_within(side: float, pixels: int) -> float:
    """The largest float scale at which `ceil(side * scale)` is still `pixels` (at most)."""
    scale = pixels / side
    while math.ceil(side * scale) > pixels:
        scale = math.nextafter(scale, 0.0)
    while math.ceil(side * math.nextafter(scale, math.inf)) <= pixels:
        scale = math.nextafter(scale, math.inf)
    return scale


class PdfPages:
    """An open PDF whose pages are rendered one at a time, on demand: iterating renders each page only when the next
    one is asked for, so a caller that drops each image before asking for the next holds one page, not the document.

    Opening checks the whole document (BadInput for what is not a PDF, is empty or encrypted, TooLarge for what is
    over a limit) before any page is rendered. Every PDFium call holds the process-wide lock, and the pages may be
    asked for from any thread, one at a time. `close` (or the `with` block) frees the document."""

    def __init__(self, data: bytes, limits: Limits) -> None:
        import pypdfium2 as pdfium

        if not data:
            raise BadInput("DOCUMENT is empty")
        if len(data) > limits.max_document_bytes:
            raise TooLarge(f"DOCUMENT has {len(data)} bytes, more than the limit of {limits.max_document_bytes}")
        self.limits = limits
        with _PDFIUM_LOCK:
            try:
                self._document: object | None = pdfium.PdfDocument(data)
            except pdfium.PdfiumError as exc:
                # PDFium refuses a well-formed PDF whose page tree is empty without setting its last error, so the
                # error code then belongs to an earlier failure: recognise an empty page tree by its declaration.
                if data.startswith(b"%PDF") and _EMPTY_PAGE_TREE.search(data):
                    raise BadInput("DOCUMENT is a PDF with no pages") from None
                if getattr(exc, "err_code", None) == pdfium.raw.FPDF_ERR_PASSWORD:
                    raise BadInput("DOCUMENT is an encrypted PDF (a password is needed)") from None
                raise BadInput(f"DOCUMENT is not a readable PDF ({exc})") from None
            try:
                self.count = len(self._document)
            except BaseException:
                self._close_locked()
                raise
        if self.count == 0:
            self.close()
            raise BadInput("DOCUMENT is a PDF with no pages")
        if self.count > limits.max_pages:
            self.close()
            raise TooLarge(f"DOCUMENT has {self.count} pages, more than the limit of {limits.max_pages}")

    def __len__(self) -> int:
        return self.count

    def render(self, index: int) -> RenderedPage:
        """Page `index` (0-based) as an RGB image, or with its error (a page PDFium cannot load or render)."""
        with _PDFIUM_LOCK:
            if self._document is None:
                raise ValueError("the PDF is closed")
            return _render_page(self._document, index, self.limits)

    def __iter__(self) -> Iterator[RenderedPage]:
        """The pages in order, each rendered when it is asked for."""
        for index in range(self.count):
            yield self.render(index)

    def close(self) -> None:
        with _PDFIUM_LOCK:
            self._close_locked()

    def _close_locked(self) -> None:
        document, self._document = self._document, None
        if document is not None:
            document.close()  # type: ignore[attr-defined]

    def __enter__(self) -> PdfPages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def render_pdf(data: bytes, limits: Limits) -> list[RenderedPage]:
    """Every page of a PDF as an RGB image, all at once (`PdfPages` renders them one at a time); BadInput for what
    is not a PDF, is empty or encrypted, TooLarge for what is over a limit."""
    with PdfPages(data, limits) as pages:
        return list(pages)


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
        bitmap = page.render(scale=render_scale(size, limits))
        try:
            image = bitmap.to_pil()  # a copy: PDFium draws BGR, Pillow keeps RGB (4 bytes a pixel, 160 MB for 40 M px)
            if image.mode != "RGB":
                image = image.convert("RGB")
        finally:
            bitmap.close()  # at once: one copy of the page is enough
        return RenderedPage(index + 1, image, size)
    except Exception as exc:
        return RenderedPage(index + 1, None, size, f"page {index + 1} cannot be rendered: {exc}")
    finally:
        page.close()
