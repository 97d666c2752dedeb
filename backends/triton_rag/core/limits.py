"""What one document-conversion request may ask for: the one place of these limits' defaults (rag.toml [docling],
the docling models' config.pbtxt parameters and `core.pdf` all take them from here). Pure: no PIL, no PDFium."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each has a setting in rag.toml [docling] (docs/DOCLING.md)."""

    max_document_bytes: int = 64 * 2**20
    max_pages: int = 200
    #: A page image (or a rendered page) larger than this is refused (images) or rendered smaller (PDF pages).
    max_image_pixels: int = 40_000_000
    #: PDF render resolution: 144 dpi is what docling renders for granite-docling.
    dpi: float = 144.0
