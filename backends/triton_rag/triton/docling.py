"""The python models of document conversion: `docling` (one page image), `docling_document` (a PDF) and the
compute model `docling_vlm` (PyTorch engine).

`docling` tiles each page and builds its prompt here, sends the pages of its dynamic batch to `docling_vlm` in one
call under a router lease, and turns each page's DocTags into a DoclingDocument. `docling_document` renders a PDF
and fans its pages out to `docling` concurrently over BLS, so pages of one document (and of several) share batches.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Sequence
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
from triton_rag.core.pdf import RenderedPage, open_image, render_pdf
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


class DoclingDocumentEndpoint:
    """Async execute: the pages' BLS requests to `docling` are in flight together, up to PAGES_IN_FLIGHT of them (a
    200-page PDF must not queue 200 PNGs at once; 16 keeps four full VLM batches of 4 pages fed)."""

    PAGES_IN_FLIGHT = 16

    def initialize(self, args: dict[str, str]) -> None:
        self.log = stub_logger(args)
        params = DoclingDocumentParameters.parse(model_parameters(args))
        self.page_model = params.page_model
        self.limits = params.limits()

    async def execute(self, requests: list[Any]) -> list[Any]:
        return [await self._convert(request) for request in requests]

    async def _convert(self, request: Any) -> Any:
        try:
            rows = _raw_rows(request, "DOCUMENT")
            if len(rows) != 1:
                raise InputError(f"DOCUMENT must hold exactly one PDF, got {len(rows)}")
            pages = render_pdf(rows[0], self.limits)
        except Exception as exc:
            return failure_response(exc, self.log)
        errors = {page.number: page.error for page in pages if page.image is None}
        #: each failed page's status code: a page PDFium cannot render is the document's own fault
        codes = dict.fromkeys(errors, "INVALID_ARG")
        rendered = [page for page in pages if page.image is not None]
        in_flight = asyncio.Semaphore(self.PAGES_IN_FLIGHT)
        results = await asyncio.gather(*(self._page(page.image, in_flight) for page in rendered))  # type: ignore[arg-type]
        doctags: dict[int, str] = {}
        for page, (tags, error, code) in zip(rendered, results, strict=True):
            if error:
                errors[page.number], codes[page.number] = error, code
            else:
                doctags[page.number] = tags
        if not doctags:
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

    async def _page(self, image: Image.Image, in_flight: asyncio.Semaphore) -> tuple[str, str, str]:
        """(DocTags, "", "") or ("", the reason the page failed, its status code): a failed page is reported, never
        raised."""
        async with in_flight:
            return await self._convert_page(image)

    async def _convert_page(self, image: Image.Image) -> tuple[str, str, str]:
        try:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)  # lossless, fast
            request = pb_utils.InferenceRequest(
                model_name=self.page_model,
                requested_output_names=["DOCTAGS"],
                inputs=[pb_utils.Tensor("IMAGE", np.array([[buffer.getvalue()]], dtype=np.object_))],
            )
            response = await request.async_exec()
            if response.has_error():
                return "", response.error().message(), answer_code(self.page_model, response.error())
            doctags = pb_utils.get_output_tensor_by_name(response, "DOCTAGS").as_numpy().reshape(-1)[0].decode()
            return doctags, "", ""
        except Exception as exc:
            code, message = failure(exc, self.log)
            return "", message, code

    def finalize(self) -> None:
        pass


def _overall(codes: dict[int, str]) -> str:
    """The status code of a document none of whose pages could be converted: the pages' code when they agree;
    else UNAVAILABLE when a retry may help one of them, else INTERNAL."""
    distinct = set(codes.values())
    if len(distinct) == 1:
        return distinct.pop()
    return "UNAVAILABLE" if any(kind_of(code).status == "UNAVAILABLE" for code in distinct) else "INTERNAL"


def _merge(pages: list[RenderedPage], doctags: dict[int, str], errors: dict[int, str], log: Logger) -> DoclingDocument:
    """One document in page order; a page without DocTags keeps its number and size and has no content. DocTags
    that docling-core cannot read fail their own page only (recorded in `errors`; the details in the log)."""
    blank = Image.new("RGB", (1, 1), "white")

    def tags(page: RenderedPage) -> PageTags:
        return PageTags(doctags.get(page.number, ""), page.image or blank, page.size_points)

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
