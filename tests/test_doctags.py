"""DocTags -> DoclingDocument on DocTags written for the test: texts, labels, list grouping, table cells, pictures,
captions, page numbers, page sizes and boxes in points, and a JSON document docling-core validates."""

from __future__ import annotations

import pytest
from docling_core.types.doc import CoordOrigin, DocItemLabel, DoclingDocument, TableItem, TextItem
from PIL import Image

from triton_rag.core.doctags import PageTags, pages_to_document

PAGE_1 = (
    "<doctag>"
    "<page_header><loc_30><loc_10><loc_200><loc_18>ACME Corp - Annual Report</page_header>"
    "<section_header_level_1><loc_30><loc_30><loc_300><loc_45>1. Introduction</section_header_level_1>"
    "<text><loc_30><loc_50><loc_470><loc_80>This is the first paragraph of the page.</text>"
    "<unordered_list>"
    "<list_item><loc_40><loc_105><loc_300><loc_112>First bullet</list_item>"
    "<list_item><loc_40><loc_114><loc_300><loc_121>Second bullet</list_item>"
    "</unordered_list>"
    "<otsl><loc_30><loc_130><loc_470><loc_200>"
    "<fcel>Name<fcel>Q1<fcel>Q2<nl>"
    "<fcel>Revenue<fcel>10<fcel>12<nl>"
    "<fcel>Cost<fcel>7<ecel><nl>"
    "<fcel>Total<lcel><fcel>5<nl>"
    "<caption><loc_30><loc_202><loc_300><loc_210>Table 1: Quarterly figures.</caption>"
    "</otsl>"
    "<picture><loc_100><loc_220><loc_400><loc_400>"
    "<caption><loc_100><loc_405><loc_400><loc_415>Figure 1: A chart.</caption>"
    "</picture>"
    "<page_footer><loc_240><loc_480><loc_260><loc_490>1</page_footer>"
    "</doctag>"
)
PAGE_2 = (
    "<doctag>"
    "<section_header_level_1><loc_50><loc_100><loc_450><loc_150>2. Results</section_header_level_1>"
    "<text><loc_50><loc_200><loc_450><loc_250>Landscape page.</text>"
    "</doctag>"
)
LETTER, A4_LANDSCAPE = (612.0, 792.0), (842.0, 595.0)


def render(size: tuple[float, float], dpi: int) -> Image.Image:
    """A blank page as the model would see it, rendered at `dpi` (boxes must not depend on it)."""
    return Image.new("RGB", (round(size[0] * dpi / 72), round(size[1] * dpi / 72)), "white")


@pytest.fixture(scope="module")
def document() -> DoclingDocument:
    pages = [PageTags(PAGE_1, render(LETTER, 144), LETTER), PageTags(PAGE_2, render(A4_LANDSCAPE, 100), A4_LANDSCAPE)]
    return pages_to_document(pages, name="report")


def body(document: DoclingDocument) -> list[tuple[str, str, int]]:
    return [
        (item.label.value, item.text if isinstance(item, TextItem) else "", item.prov[0].page_no)
        for item, _ in document.iterate_items(with_groups=False)
    ]


def test_texts_labels_and_pages_in_reading_order(document: DoclingDocument) -> None:
    assert body(document) == [
        ("section_header", "1. Introduction", 1),
        ("text", "This is the first paragraph of the page.", 1),
        ("list_item", "First bullet", 1),
        ("list_item", "Second bullet", 1),
        ("caption", "Table 1: Quarterly figures.", 1),
        ("table", "", 1),
        ("caption", "Figure 1: A chart.", 1),
        ("picture", "", 1),
        ("section_header", "2. Results", 2),
        ("text", "Landscape page.", 2),
    ]
    furniture = {t.label: t.text for t in document.texts if t.content_layer.value == "furniture"}
    assert furniture == {DocItemLabel.PAGE_HEADER: "ACME Corp - Annual Report", DocItemLabel.PAGE_FOOTER: "1"}
    (group,) = document.groups
    assert group.label.value == "list" and [c.cref for c in group.children] == ["#/texts/3", "#/texts/4"]


def test_table_cells(document: DoclingDocument) -> None:
    (table,) = document.tables
    assert isinstance(table, TableItem)
    grid = [[cell.text for cell in row] for row in table.data.grid]
    assert grid == [["Name", "Q1", "Q2"], ["Revenue", "10", "12"], ["Cost", "7", ""], ["Total", "Total", "5"]]
    spanning = [c for c in table.data.table_cells if c.col_span > 1]
    assert [(c.text, c.start_row_offset_idx, c.start_col_offset_idx, c.col_span) for c in spanning] == [
        ("Total", 3, 0, 2)
    ]
    assert [document.texts[int(ref.cref.split("/")[-1])].text for ref in table.captions] == [
        "Table 1: Quarterly figures."
    ]


def test_pages_and_boxes_are_in_points_whatever_the_render_resolution(document: DoclingDocument) -> None:
    assert {n: (p.size.width, p.size.height, p.image) for n, p in document.pages.items()} == {
        1: (*LETTER, None),
        2: (*A4_LANDSCAPE, None),
    }
    header = next(t for t in document.texts if t.text == "1. Introduction").prov[0].bbox
    assert header.coord_origin == CoordOrigin.TOPLEFT
    assert (header.l, header.t, header.r, header.b) == pytest.approx(
        (30 / 500 * 612, 30 / 500 * 792, 300 / 500 * 612, 45 / 500 * 792)
    )
    results = next(t for t in document.texts if t.text == "2. Results").prov[0].bbox
    assert (results.l, results.t, results.r, results.b) == pytest.approx(
        (50 / 500 * 842, 100 / 500 * 595, 450 / 500 * 842, 150 / 500 * 595)
    )
    picture = document.pictures[0]
    assert picture.image is None and picture.prov[0].bbox.b == pytest.approx(400 / 500 * 792)


def test_json_is_small_and_validates(document: DoclingDocument) -> None:
    text = document.model_dump_json()
    assert len(text) < 20_000, "page images and crops must not be embedded by default"
    assert DoclingDocument.model_validate_json(text) == document


def test_images_kept_on_request_and_empty_input_refused() -> None:
    kept = pages_to_document([PageTags(PAGE_2, render(A4_LANDSCAPE, 72), A4_LANDSCAPE)], keep_images=True)
    assert kept.pages[1].image is not None
    with pytest.raises(ValueError, match="at least one page"):
        pages_to_document([])
