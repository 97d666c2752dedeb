"""The python models of document conversion: `docling` (one page image), `docling_document` (a PDF) and the
compute model `docling_vlm` (PyTorch engine).

`docling` tiles each page and builds its prompt here, sends the pages of its dynamic batch to `docling_vlm` in one
call under a router lease, and turns each page's DocTags into a DoclingDocument. `docling_document` streams a PDF:
it renders each page just before it is sent to `docling` over BLS, a few pages in flight at once, so pages of one
document (and of several) share batches and memory does not grow with the page count.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import io
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from docling_core.types.doc import DoclingDocument
from PIL import Image

from triton_rag import contract
from triton_rag.contract.params import DoclingDocumentParameters, DoclingPageParameters, VlmParameters
from triton_rag.core.docling_prompt import PagePrompts
from triton_rag.core.doctags import PageTags, pages_to_document
from triton_rag.core.errors import RequestError, kind_of
from triton_rag.core.idefics3 import ImageProcessorConfig, Tiles, preprocess
from triton_rag.core.logs import Logger
from triton_rag.core.pdf import PdfPages, RenderedPage, open_image
from triton_rag.core.stream import convert_in_order
from triton_rag.core.text import InputError
from triton_rag.triton.common import (
    RouterClient,
    answer_code,
    answer_each,
    call_model,
    execute_jointly,
    failure,
    failure_response,
    model_parameters,
    stub_logger,
)


def _raw_rows(request: Any, name: str) -> list[bytes]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InputError(f"missing input {name}")
    return [bytes(value) for value in tensor.as_numpy().reshape(-1)]


def _strings(name: str, values: list[str], batched: bool = True) -> Any:
    """A string output: [rows, 1] for a batched model, [1] for one that is not (max_batch_size 0)."""
    data = np.array([v.encode() for v in values], dtype=np.object_)
    return pb_utils.Tensor(name, data.reshape(-1, 1) if batched else data)


class _Page:
    def __init__(self, image: Image.Image, tiles: Tiles, input_ids: np.ndarray, want_json: bool) -> None:
        self.image, self.tiles, self.input_ids = image, tiles, input_ids
        #: docling_document asks for DOCTAGS only (it builds the whole document itself): skip the page's JSON then.
        self.want_json = want_json


def pack_pages(pages: list[_Page], max_new_tokens: int) -> dict[str, np.ndarray]:
    """The docling_vlm request for a batch of pages: tiles zero-padded to the largest page, prompts left-padded."""
    rows, images = len(pages), max(len(p.tiles.pixels) for p in pages)
    width = max(len(p.input_ids) for p in pages)
    tile = contract.DOCLING_TILE
    pixels = np.zeros((rows, images, 3, tile, tile), dtype=np.uint8)
    ids = np.zeros((rows, width), dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for row, page in enumerate(pages):
        pixels[row, : len(page.tiles.pixels)] = page.tiles.pixels
        ids[row, width - len(page.input_ids) :] = page.input_ids
        mask[row, width - len(page.input_ids) :] = 1
    return {
        "PIXELS": pixels,
        "NUM_IMAGES": np.array([[len(p.tiles.pixels)] for p in pages], dtype=np.int32),
        "INPUT_IDS": ids,
        "ATTENTION_MASK": mask,
        "MAX_NEW_TOKENS": np.full((rows, 1), max_new_tokens, dtype=np.int32),
    }


class DoclingEndpoint:
    def initialize(self, args: dict[str, str]) -> None:
        self.log = stub_logger(args)
        from transformers import AutoTokenizer

        params = DoclingPageParameters.parse(model_parameters(args))
        self.vlm = params.vlm
        self.router = RouterClient(params.router)
        self.max_new_tokens = params.max_new_tokens
        self.limits = params.limits()
        tokenizer_dir = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.image_config = ImageProcessorConfig.from_preprocessor_config(
            json.loads((tokenizer_dir / "preprocessor_config.json").read_text())
        )
        self.prompts = PagePrompts(tokenizer, params.prompt, self.image_config, params.eos_token_id)
        self.max_pages_per_call = contract.docling_vlm().max_batch_size

    def _read_pages(self, request: Any) -> list[_Page]:
        pages = []
        want_json = "STRUCTURED_JSON" in request.requested_output_names()
        for row, data in enumerate(_raw_rows(request, "IMAGE")):
            try:  # decoded and converted to RGB once, before any model work: tiles and the JSON both use this image
                image = open_image(data, self.limits)
            except RequestError as exc:  # the same kind (TooLarge stays TooLarge), naming the row
                raise type(exc)(f"row {row}: {exc}") from None
            tiles = preprocess(image, self.image_config)
            pages.append(_Page(image, tiles, self.prompts.encode(tiles), want_json))
        return pages

    def _generate(self, pages: list[_Page]) -> list[list[int]]:
        generated: list[list[int]] = []
        step = self.max_pages_per_call
        for start in range(0, len(pages), step):
            inputs = pack_pages(pages[start : start + step], self.max_new_tokens)
            ids = call_model(self.vlm, inputs, ["GENERATED_IDS"])["GENERATED_IDS"]
            generated += [[int(t) for t in row if t >= 0] for row in ids]
        return generated

    def execute(self, requests: list[Any]) -> list[Any]:
        return execute_jointly(requests, self._read_pages, self._run_vlm, self._respond, log=self.log)

    def _run_vlm(self, pages: list[_Page]) -> list[list[int]]:
        return self.router.run(self.vlm, lambda: self._generate(pages))

    def _respond(self, pages: Sequence[_Page], generated: Sequence[list[int]]) -> Any:
        doctags = [self.prompts.decode(ids) for ids in generated]
        outputs = [_strings("DOCTAGS", doctags)]
        if pages[0].want_json:
            documents = [
                pages_to_document([PageTags(tags, page.image)], name="page").model_dump_json()
                for tags, page in zip(doctags, pages, strict=True)
            ]
            outputs.append(_strings("STRUCTURED_JSON", documents))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def finalize(self) -> None:
        pass


@dataclass(frozen=True)
class _EncodedPage:
    """A rendered page on its way to `docling`: its PNG only (the image is dropped once encoded)."""

    number: int  # 1-based
    size_points: tuple[float, float]
    pixel_size: tuple[int, int]  # the rendered image's, which the merge places the page's boxes on
    png: bytes  # empty when the page could not be rendered
    error: str = ""


@dataclass(frozen=True)
class _PageResult:
    """What the merge needs of a page once `docling` has answered: no image, no PNG."""

    number: int
    size_points: tuple[float, float]
    pixel_size: tuple[int, int]
    doctags: str = ""
    error: str = ""
    code: str = ""  # the status code of a failed page


def _encoded_pages(pdf: PdfPages) -> Iterator[_EncodedPage]:
    """Each page rendered when asked for and encoded as PNG (lossless, fast); no image outlives its encoding (a
    loop variable holding one would keep it through the next page's render)."""
    for index in range(len(pdf)):
        yield _encode(pdf.render(index))


def _encode(page: RenderedPage) -> _EncodedPage:
    if page.image is None:
        return _EncodedPage(page.number, page.size_points, (0, 0), b"", page.error)
    buffer = io.BytesIO()
    page.image.save(buffer, format="PNG", compress_level=1)
    return _EncodedPage(page.number, page.size_points, page.image.size, buffer.getvalue())


class DoclingDocumentEndpoint:
    """Async execute: a PDF is converted as a stream (core.stream.convert_in_order). A page is rendered and encoded
    (in a worker thread, under the PDFium lock) only when fewer than PAGES_IN_FLIGHT pages of the document are
    rendered and not yet answered by `docling`; its image is dropped as soon as it is encoded, its PNG as soon as
    `docling` has answered, so memory stays the same whatever the page count (issue 23). PAGES_IN_FLIGHT is twice
    `docling`'s max batch: one full batch computing while the next waits in its queue keeps the VLM fed by a single
    document, and pages of other documents fill in beside it."""

    PAGES_IN_FLIGHT = 2 * contract.docling_endpoint().max_batch_size

    def initialize(self, args: dict[str, str]) -> None:
        self.log = stub_logger(args)
        params = DoclingDocumentParameters.parse(model_parameters(args))
        self.page_model = params.page_model
        self.limits = params.limits()
        #: every page of every document is rendered and encoded on this one thread (PDFium takes one at a time
        #: anyway): one glibc heap arena, reused page after page, instead of one arena per pool thread holding on
        self.renderer = ThreadPoolExecutor(1, thread_name_prefix="pdf-render")

    async def execute(self, requests: list[Any]) -> list[Any]:
        return [await self._convert(request) for request in requests]

    async def _convert(self, request: Any) -> Any:
        try:
            return await self._convert_document(request)
        finally:
            _trim_heap()  # a document's pages were freed: give their memory back to the system

    async def _convert_document(self, request: Any) -> Any:
        try:
            rows = _raw_rows(request, "DOCUMENT")
            if len(rows) != 1:
                raise InputError(f"DOCUMENT must hold exactly one PDF, got {len(rows)}")
            pdf = PdfPages(rows[0], self.limits)  # the whole document is checked here, before any page renders
        except Exception as exc:
            return failure_response(exc, self.log)
        try:
            pages = await convert_in_order(
                _encoded_pages(pdf), self._page, self.PAGES_IN_FLIGHT, executor=self.renderer
            )
        except Exception as exc:
            return failure_response(exc, self.log)
        finally:  # on the render thread: after a render still running there (a cancelled request) has finished
            await asyncio.get_running_loop().run_in_executor(self.renderer, pdf.close)
        errors = {page.number: page.error for page in pages if page.error}
        doctags = {page.number: page.doctags for page in pages if not page.error}
        if not doctags:
            codes = {page.number: page.code for page in pages}
            reasons = "; ".join(f"page {n}: {e}" for n, e in sorted(errors.items()))
            return failure_response(kind_of(_overall(codes))(f"no page could be converted ({reasons})"), self.log)
        document = _merge(pages, doctags, errors, self.log)
        page_errors = json.dumps({str(n): e for n, e in sorted(errors.items())})
        return pb_utils.InferenceResponse(
            output_tensors=[
                _strings("STRUCTURED_JSON", [document.model_dump_json()], batched=False),
                _strings("PAGE_ERRORS", [page_errors], batched=False),
            ]
        )

    async def _page(self, page: _EncodedPage) -> _PageResult:
        """The page's DocTags, or the reason it failed and its status code: a failed page is reported, never
        raised. A page PDFium cannot render is the document's own fault (INVALID_ARG)."""
        result = functools.partial(_PageResult, page.number, page.size_points, page.pixel_size)
        if page.error:
            return result(error=page.error, code="INVALID_ARG")
        try:
            request = pb_utils.InferenceRequest(
                model_name=self.page_model,
                requested_output_names=["DOCTAGS"],
                inputs=[pb_utils.Tensor("IMAGE", np.array([[page.png]], dtype=np.object_))],
            )
            del page  # the request holds the PNG now, until `docling` answers
            response = await request.async_exec()
            del request
            if response.has_error():
                message = response.error().message()
                return result(error=message, code=answer_code(self.page_model, response.error()))
            doctags = pb_utils.get_output_tensor_by_name(response, "DOCTAGS").as_numpy().reshape(-1)[0].decode()
            return result(doctags=doctags)
        except Exception as exc:
            code, message = failure(exc, self.log)
            return result(error=message, code=code)

    def finalize(self) -> None:
        self.renderer.shutdown(wait=True)


def _trim_heap() -> None:
    """glibc's `malloc_trim(0)`: freed heap memory (a page image is tens of MB, in many blocks) goes back to the
    system instead of staying in the process's arenas. Nothing where the C library is not glibc."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            _MALLOC_TRIM.argtypes, _MALLOC_TRIM.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _overall(codes: dict[int, str]) -> str:
    """The status code of a document none of whose pages could be converted: the pages' code when they agree;
    else UNAVAILABLE when a retry may help one of them, else INTERNAL."""
    distinct = set(codes.values())
    if len(distinct) == 1:
        return distinct.pop()
    return "UNAVAILABLE" if any(kind_of(code).status == "UNAVAILABLE" for code in distinct) else "INTERNAL"


#: The merge's stand-in page images hold one byte per pixel; past this many pixels in all (a document of many
#: distinct page sizes), a page gets a stand-in scaled down to fit, whose boxes agree to the last few float bits.
PLACEHOLDER_PIXELS = 256_000_000


def _merge(
    pages: Sequence[_PageResult], doctags: dict[int, str], errors: dict[int, str], log: Logger
) -> DoclingDocument:
    """One document in page order; a page without DocTags keeps its number and size and has no content. DocTags
    that docling-core cannot read fail their own page only (recorded in `errors`; the details in the log).

    docling-core places a page's boxes on its image and only reads the image's size (the crops and page images it
    makes are dropped), so each page gets a blank stand-in of its rendered size, one per distinct size, in a mode of
    one byte per pixel: the same document as from the rendered images, without keeping them."""
    blank = Image.new("RGB", (1, 1), "white")
    stand_ins: dict[tuple[int, int], Image.Image] = {}
    budget = PLACEHOLDER_PIXELS

    def stand_in(size: tuple[int, int]) -> Image.Image:
        nonlocal budget
        if size not in stand_ins:
            width, height = size
            if width * height > budget:  # many distinct sizes: smaller stand-ins (1 M px each at least)
                ratio = min(1.0, (max(budget, 1_000_000) / (width * height)) ** 0.5)
                width, height = max(1, int(width * ratio)), max(1, int(height * ratio))
            budget -= width * height
            stand_ins[size] = Image.new("1", (width, height), 1)
        return stand_ins[size]

    def tags(page: _PageResult) -> PageTags:
        if page.number not in doctags:
            return PageTags("", blank, page.size_points)
        return PageTags(doctags[page.number], stand_in(page.pixel_size), page.size_points)

    try:
        return pages_to_document([tags(p) for p in pages], name="document")
    except Exception:
        for page in pages:
            if page.number in doctags:
                try:
                    pages_to_document([tags(page)])
                except Exception as exc:
                    errors[page.number] = f"its DocTags cannot be decoded: {failure(exc, log)[1]}"
                    del doctags[page.number]
        return pages_to_document([tags(p) for p in pages], name="document")


class VlmModel:
    """`docling_vlm` on the PyTorch engine (CUDA when present)."""

    def initialize(self, args: dict[str, str]) -> None:
        from triton_rag.engines.torch_vlm import TorchVlm

        self.log = stub_logger(args)
        params = VlmParameters.parse(model_parameters(args))
        self.stop_ids = params.stop_ids
        #: A separate vision model (a TensorRT plan of the tower) computes the image embeddings when configured.
        self.vision_model = params.vision_model
        self.engine = TorchVlm(
            Path(args["model_repository"]) / args["model_version"] / "hf",
            params.dtype,
            device_memory_cap=params.device_memory_cap,
            log=self.log.info,
        )
        self.log.info(f"VLM engine on {self.engine.device} in {self.engine.dtype}")

    def execute(self, requests: list[Any]) -> list[Any]:
        return answer_each(requests, self._compute, self.log)

    def _compute(self, request: Any) -> list[Any]:
        inputs = {
            name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            for name in ("PIXELS", "NUM_IMAGES", "INPUT_IDS", "ATTENTION_MASK", "MAX_NEW_TOKENS")
        }
        ids, mask = inputs["INPUT_IDS"], inputs["ATTENTION_MASK"]
        pages = [
            self._page(inputs["PIXELS"][row, : int(count)], ids[row][mask[row] == 1])
            for row, count in enumerate(inputs["NUM_IMAGES"].reshape(-1))
        ]
        limits = [int(x) for x in inputs["MAX_NEW_TOKENS"].reshape(-1)]
        generated = self.engine.generate(pages, limits, self.stop_ids)
        out = np.full((len(generated), max(len(g) for g in generated)), -1, dtype=np.int64)
        for row, row_ids in enumerate(generated):
            out[row, : len(row_ids)] = row_ids
        return [pb_utils.Tensor("GENERATED_IDS", out)]

    def _page(self, pixels: np.ndarray, input_ids: np.ndarray) -> Any:
        from triton_rag.engines.torch_vlm import PageInput

        if not self.vision_model:
            return PageInput(pixels, input_ids)
        embeds = call_model(self.vision_model, {"PIXELS": pixels}, ["IMAGE_EMBEDS"])["IMAGE_EMBEDS"]
        return PageInput(pixels, input_ids, embeds.astype(np.float32))

    def finalize(self) -> None:
        del self.engine
