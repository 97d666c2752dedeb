"""Converting a sequence of items (a PDF's pages) with a bounded number in flight, results in order.

`docling_document` must not hold a whole document's rendered pages at once (issue 23): a page is taken from its
source (rendered) only when a slot is free, and a slot is freed when that page's conversion has finished, so at most
`in_flight` pages exist at any moment, whatever the page count. Pure asyncio: no Triton here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


async def convert_in_order(
    source: Iterator[T],
    convert: Callable[[T], Awaitable[R]],
    in_flight: int,
    *,
    produce_in_thread: bool = True,
    executor: Executor | None = None,
) -> list[R]:
    """`convert` applied to every item of `source`, the results in source order.

    The next item is asked of `source` only while fewer than `in_flight` items have been taken and not yet
    converted, so items taken and not finished (the one being produced included) never exceed `in_flight`; `source`
    is advanced one item at a time, in a worker thread with `produce_in_thread` (rendering a page blocks: the event
    loop keeps answering the conversions in flight meanwhile): `executor`'s, else the loop's default executor. One
    thread for every document is best for memory: glibc gives each thread its own heap arena, and memory freed in
    one arena does not serve another thread's next page. Each item is referenced only by its own conversion,
    so it is freed when that finishes. An exception from `source` or `convert` cancels the conversions in flight
    and is raised."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    tasks: list[asyncio.Future[R]] = []
    pending: set[asyncio.Future[R]] = set()
    try:
        while True:
            while len(pending) >= in_flight:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:  # a conversion that failed ends the whole run now, not after the rest
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if produce_in_thread:
                item = await asyncio.get_running_loop().run_in_executor(executor, next, source, _END)
            else:
                item = next(source, _END)
            if item is _END:
                break
            task = asyncio.ensure_future(convert(item))  # type: ignore[arg-type]
            del item  # only the conversion holds the item now
            tasks.append(task)
            pending.add(task)
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        raise
