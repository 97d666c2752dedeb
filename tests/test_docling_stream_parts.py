"""The pure parts of streaming a PDF (issue 23): pages rendered one at a time, a bounded number in flight."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_docling_parts import make_pdf
from triton_rag.core.errors import BadInput, TooLarge
from triton_rag.core.pdf import Limits, PdfPages, render_pdf
from triton_rag.core.stream import convert_in_order


class Counting:
    """A source of items that counts those taken and not yet converted."""

    def __init__(self, count: int) -> None:
        self.count, self.outstanding, self.most = count, 0, 0
        self.taken: list[int] = []
        self.lock = threading.Lock()  # taken on the render thread, converted on the event loop's

    def __iter__(self) -> Iterator[int]:
        for item in range(self.count):
            with self.lock:
                self.outstanding += 1
                self.most = max(self.most, self.outstanding)
                self.taken.append(item)
            yield item

    async def convert(self, item: int) -> str:
        await asyncio.sleep(random.random() / 500)  # conversions finish out of order
        with self.lock:
            self.outstanding -= 1
        return f"page {item}"


@pytest.mark.parametrize("in_flight", [1, 3, 8])
@pytest.mark.parametrize("threaded", [False, True])
def test_items_are_taken_in_order_never_more_than_the_bound_outstanding(in_flight: int, threaded: bool) -> None:
    random.seed(in_flight)
    source = Counting(40)
    with ThreadPoolExecutor(1) as executor:
        results = asyncio.run(
            convert_in_order(iter(source), source.convert, in_flight, produce_in_thread=threaded, executor=executor)
        )
    assert results == [f"page {i}" for i in range(40)]
    assert source.taken == list(range(40))
    assert source.most == in_flight
    assert source.outstanding == 0


def test_an_item_is_taken_only_when_a_slot_is_free() -> None:
    release = asyncio.Event()
    taken: list[int] = []

    def source() -> Iterator[int]:
        for item in range(10):
            taken.append(item)
            yield item

    async def convert(item: int) -> int:
        await release.wait()
        return item

    async def run() -> list[int]:
        task = asyncio.ensure_future(convert_in_order(source(), convert, 4, produce_in_thread=False))
        for _ in range(20):
            await asyncio.sleep(0)
        assert taken == [0, 1, 2, 3]  # the rest is not rendered while four wait
        release.set()
        return await task

    assert asyncio.run(run()) == list(range(10))


def test_a_failing_conversion_cancels_the_rest_and_is_raised() -> None:
    cancelled: list[int] = []

    async def convert(item: int) -> int:
        if item == 2:
            raise RuntimeError("page 2 broke")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(item)
            raise
        return item

    with pytest.raises(RuntimeError, match="page 2 broke"):
        asyncio.run(convert_in_order(iter(range(100)), convert, 4, produce_in_thread=False))
    assert sorted(cancelled) == [0, 1, 3]
    with pytest.raises(ValueError, match="at least 1"):
        asyncio.run(convert_in_order(iter(range(3)), convert, 0))


def test_a_pdf_is_checked_when_opened_and_rendered_page_by_page() -> None:
    pdf = make_pdf((612, 792), (842, 595), (300, 400))
    with PdfPages(pdf, Limits()) as pages:
        assert len(pages) == 3
        second = pages.render(1)  # any page, on its own
        assert (second.number, second.size_points, second.image.size) == (2, (842.0, 595.0), (1684, 1190))  # type: ignore[union-attr]
        assert [(p.number, p.image.size) for p in pages] == [  # type: ignore[union-attr]
            (1, (1224, 1584)),
            (2, (1684, 1190)),
            (3, (600, 800)),
        ]
    with pytest.raises(ValueError, match="closed"):
        pages.render(0)
    assert [p.image.tobytes() for p in render_pdf(pdf, Limits())] == [  # type: ignore[union-attr]
        p.image.tobytes()  # type: ignore[union-attr]
        for p in PdfPages(pdf, Limits())
    ]
    with pytest.raises(TooLarge, match="3 pages, more than the limit of 2"):
        PdfPages(pdf, Limits(max_pages=2))  # refused before any page is rendered
    with pytest.raises(BadInput, match="not a readable PDF"):
        PdfPages(b"%PDF-1.4 nothing", Limits())
