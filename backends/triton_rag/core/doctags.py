"""DocTags (what granite-docling generates) to a DoclingDocument, with docling-core's own decoder.

docling-core places `<loc_N>` boxes (0..500 on each axis of the whole page) on the page image it is given, so sizes
come out in that image's pixels. We pass the image the model saw and then rescale boxes and page sizes to the page's
real size (PDF points for a PDF page), so the output does not depend on the render resolution. Page images and
picture crops, which docling-core embeds as base64 PNGs (megabytes per page), are dropped unless asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from docling_core.types.doc import ContentLayer, DocItem, DoclingDocument, Size
from docling_core.types.doc.document import DocTagsDocument
from PIL import Image


@dataclass(frozen=True)
class PageTags:
    """One page: the generated DocTags, the image the model saw, and the page's real size (width, height); None
    keeps the image's pixel size."""

    doctags: str
    image: Image.Image
    size: tuple[float, float] | None = None


def pages_to_document(pages: Sequence[PageTags], name: str = "Document", keep_images: bool = False) -> DoclingDocument:
    """A DoclingDocument with pages numbered 1..N in the given order."""
    if not pages:
        raise ValueError("a document needs at least one page")
    tags = DocTagsDocument.from_doctags_and_image_pairs([p.doctags for p in pages], [p.image for p in pages])
    document = DoclingDocument.load_from_doctags(tags, document_name=name)
    scale: dict[int, tuple[float, float]] = {}
    for page_no, page in enumerate(pages, start=1):
        item = document.pages[page_no]
        width, height = page.size or (item.size.width, item.size.height)
        scale[page_no] = (width / item.size.width, height / item.size.height)
        item.size = Size(width=width, height=height)
        if not keep_images:
            item.image = None
    layers = set(ContentLayer)
    for node, _ in document.iterate_items(with_groups=False, traverse_pictures=True, included_content_layers=layers):
        if not isinstance(node, DocItem):
            continue
        for prov in node.prov:
            sx, sy = scale[prov.page_no]
            box = prov.bbox
            prov.bbox = box.model_copy(update={"l": box.l * sx, "r": box.r * sx, "t": box.t * sy, "b": box.b * sy})
        if not keep_images and getattr(node, "image", None) is not None:
            node.image = None  # type: ignore[attr-defined]
    return document
