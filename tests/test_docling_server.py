"""`docling` and `docling_document` on the real tritonserver with the tiny random granite-docling (CPU).

The model's DocTags are noise, so the server is checked against our reference pipeline on the same weights:
transformers' Idefics3 processor and `generate`, decoded with special tokens kept, then docling-core. A page-model
stand-in that writes known DocTags (and fails landscape pages on purpose) checks the document merge exactly.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from docling_core.types.doc import DocItemLabel, DoclingDocument
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.harness import CACHE_DIR, RunningServer, add_page_stand_in, landscape_failing_page_py, start_server, strings
from tests.test_docling_parts import IMAGE_MODES, PROMPT, empty_pdf, make_pdf, noise_page, page_in_mode
from triton_rag import contract
from triton_rag.build.repository import prepare_repository
from triton_rag.build.settings import DoclingSettings, Settings
from triton_rag.client import RouterControl
from triton_rag.core.docling_prompt import GRANITE_CHAT
from triton_rag.core.doctags import PageTags, pages_to_document
from triton_rag.core.pdf import Limits, open_image, render_pdf

NEW_TOKENS = 16
MAX_PIXELS = 12_000_000
MAX_PAGES = 4
#: Fault injection, not a mock of what is tested: a page model that writes fixed DocTags and fails landscape pages,
#: so that `docling_document`'s merge and its page-error reporting can be checked exactly.
FIXED_DOCTAGS = (
    "<doctag><section_header_level_1><loc_50><loc_25><loc_450><loc_50>Title</section_header_level_1></doctag>"
)
FAULTY_PAGE_PY = landscape_failing_page_py(FIXED_DOCTAGS)


@pytest.fixture(scope="module")
def docling_server(tmp_path_factory: pytest.TempPathFactory, tiny_docling_dir: Path) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("docling_repository")
    docling = DoclingSettings(
        model=str(tiny_docling_dir), max_new_tokens=NEW_TOKENS, max_image_pixels=MAX_PIXELS, max_pages=MAX_PAGES
    )
    prepare_repository(Settings(docling=docling, offline_fallback=False), repository, CACHE_DIR, endpoints=("docling",))
    add_page_stand_in(repository, "faulty_page", FAULTY_PAGE_PY, "faulty_document")  # fault injection
    yield from start_server(repository, tmp_path_factory.mktemp("logs") / "docling_server.log")


@pytest.fixture(scope="module")
def reference(tiny_docling_dir: Path):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(str(tiny_docling_dir), dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(str(tiny_docling_dir))


def reference_doctags(reference, image: Image.Image) -> str:
    """The model card's recipe: processor, greedy generate, decode keeping special tokens, drop the stop token."""
    model, processor = reference
    inputs = processor(text=GRANITE_CHAT.format(prompt=PROMPT), images=[image.convert("RGB")], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[100257, 100328], pad_token_id=100257
        )
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
    return text.removesuffix("<|end_of_text|>").lstrip()


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def convert_page(server: RunningServer, images: list[bytes]) -> tuple[list[str], list[str]]:
    result = server.client().infer(contract.DOCLING_ENDPOINT, [strings("IMAGE", images)])
    decode = lambda name: [v.decode() for v in result.as_numpy(name).reshape(-1)]  # noqa: E731
    return decode("DOCTAGS"), decode("STRUCTURED_JSON")


def convert_document(server: RunningServer, pdf: bytes, model: str = contract.DOCLING_DOCUMENT_ENDPOINT):
    tensor = grpcclient.InferInput("DOCUMENT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([pdf], dtype=np.object_))
    result = server.client().infer(model, [tensor])
    document = DoclingDocument.model_validate_json(result.as_numpy("STRUCTURED_JSON")[0])
    return document, json.loads(result.as_numpy("PAGE_ERRORS")[0])


def test_a_page_image_becomes_the_reference_doctags_and_a_valid_document(docling_server, reference) -> None:
    image = noise_page(10, 612, 792)
    (doctags,), (document_json,) = convert_page(docling_server, [encoded(image)])
    assert doctags == reference_doctags(reference, image)
    document = DoclingDocument.model_validate_json(document_json)
    assert {n: (p.size.width, p.size.height) for n, p in document.pages.items()} == {1: (612.0, 792.0)}
    assert document == pages_to_document([PageTags(doctags, image)], name="page")
    jpeg = encoded(image, "JPEG")
    (jpeg_tags,), _ = convert_page(docling_server, [jpeg])
    assert jpeg_tags == reference_doctags(reference, Image.open(io.BytesIO(jpeg)))


def test_pages_alone_in_one_request_and_concurrently_agree(docling_server) -> None:
    images = [encoded(noise_page(20 + i, *size)) for i, size in enumerate([(612, 792), (842, 595), (400, 300)])]
    alone = [convert_page(docling_server, [image])[0][0] for image in images]
    assert len(set(alone)) == 3
    assert convert_page(docling_server, images)[0] == alone  # three rows of one request
    with ThreadPoolExecutor(6) as pool:  # six requests at once: the dynamic batcher mixes them
        together = list(pool.map(lambda i: convert_page(docling_server, [images[i % 3]])[0][0], range(6)))
    assert together == [alone[i % 3] for i in range(6)]


def document_of_pages_alone(server: RunningServer, pdf: bytes) -> DoclingDocument:
    """What docling_document must answer for `pdf`: each page rendered here and converted alone by the `docling`
    endpoint, the pages merged by core.doctags."""
    rendered = render_pdf(pdf, Limits())
    page_tags = [convert_page(server, [encoded(page.image)])[0][0] for page in rendered]  # type: ignore[arg-type]
    return pages_to_document(
        [PageTags(tags, page.image, page.size_points) for tags, page in zip(page_tags, rendered, strict=True)],  # type: ignore[arg-type]
        name="document",
    )


def test_a_pdf_becomes_one_document_with_its_pages_in_points(docling_server) -> None:
    pdf = make_pdf((612, 792), (842, 595))
    document, errors = convert_document(docling_server, pdf)
    assert errors == {}
    assert {n: (p.page_no, p.size.width, p.size.height) for n, p in document.pages.items()} == {
        1: (1, 612.0, 792.0),
        2: (2, 842.0, 595.0),
    }
    assert document == document_of_pages_alone(docling_server, pdf)


def test_a_failed_page_is_reported_and_keeps_its_place(docling_server) -> None:
    document, errors = convert_document(docling_server, make_pdf((612, 792), (842, 595), (300, 400)), "faulty_document")
    assert errors == {"2": "injected failure for a landscape page"}
    assert sorted(document.pages) == [1, 2, 3] and document.pages[2].size.width == 842.0
    headers = [item for item, _ in document.iterate_items() if item.label == DocItemLabel.SECTION_HEADER]
    assert [(h.text, h.prov[0].page_no) for h in headers] == [("Title", 1), ("Title", 3)]
    box = headers[0].prov[0].bbox  # <loc_50><loc_25><loc_450><loc_50> of a 612 x 792 pt page
    assert (box.l, box.t, box.r, box.b) == pytest.approx((61.2, 39.6, 550.8, 79.2))
    with pytest.raises(InferenceServerException, match="no page could be converted"):
        convert_document(docling_server, make_pdf((842, 595)), "faulty_document")


def test_a_poster_only_pdf_is_rendered_to_fit_the_pixel_limit_and_converts(docling_server) -> None:
    # 3100 pt at 144 dpi is 6200 x 6200 px, over MAX_PIXELS (12 M): rendered at 3464 x 3464, which `docling`'s pixel
    # check accepts (rounding the downscale up gave 3465 x 3465 = 12,006,225 px: refused, "no page could be converted")
    document, errors = convert_document(docling_server, make_pdf((3100, 3100)))
    assert errors == {}
    assert {n: (p.size.width, p.size.height) for n, p in document.pages.items()} == {1: (3100.0, 3100.0)}


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_every_image_mode_converts_from_its_rgb_image(docling_server, mode: str) -> None:
    data = page_in_mode(mode, 300, 200)
    (doctags,), (document_json,) = convert_page(docling_server, [data])
    document = DoclingDocument.model_validate_json(document_json)  # built from the RGB image: no PNG-mode error
    assert {n: (p.size.width, p.size.height) for n, p in document.pages.items()} == {1: (300.0, 200.0)}
    # the model saw the converted image: the same DocTags as that RGB image sent as a PNG
    assert convert_page(docling_server, [encoded(open_image(data, Limits()))])[0] == [doctags]


def test_an_undecodable_image_in_a_dynamic_batch_fails_alone(docling_server) -> None:
    """Both `docling` instances are kept busy by 3-row requests, so a bad and a good 1-row request that arrive
    meanwhile wait together and are executed as one batch of 2 (Triton's batch statistics say when that happened:
    the busy requests are batches of 3). The bad one gets its own INVALID_ARG, the good one its answer."""
    good = encoded(noise_page(60, 300, 200))
    whole = encoded(noise_page(61, 300, 200))
    bad = whole[: len(whole) // 2]  # a PNG header Pillow opens, pixels that cannot be decoded
    busy = [encoded(noise_page(62 + i, 1600, 1200)) for i in range(3)]
    expected = convert_page(docling_server, [good])[0]
    clients = [docling_server.client() for _ in range(4)]

    def pairs() -> int:
        stats = clients[0].get_inference_statistics(contract.DOCLING_ENDPOINT, as_json=True)["model_stats"][0]
        return sum(int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", []) if int(b["batch_size"]) == 2)

    def send(client: grpcclient.InferenceServerClient, images: list[bytes], start: threading.Event):
        start.wait()
        try:
            result = client.infer(contract.DOCLING_ENDPOINT, [strings("IMAGE", images)])
            return [v.decode() for v in result.as_numpy("DOCTAGS").reshape(-1)]
        except InferenceServerException as exc:
            return exc

    for _ in range(5):  # the scheduling is the OS's: retry until the pair met in one batch
        before = pairs()
        with ThreadPoolExecutor(4) as pool:
            go_busy, go_pair = threading.Event(), threading.Event()
            busy_results = [pool.submit(send, clients[i], busy, go_busy) for i in (0, 1)]
            go_busy.set()
            time.sleep(0.3)
            bad_result, good_result = (
                pool.submit(send, clients[i], [image], go_pair) for i, image in ((2, bad), (3, good))
            )
            go_pair.set()
            failed, answered = bad_result.result(), good_result.result()
            assert all(isinstance(r.result(), list) for r in busy_results)
        assert isinstance(failed, InferenceServerException) and "INVALID_ARG" in str(failed.status())
        assert "cannot be decoded" in str(failed.message())
        assert answered == expected
        if pairs() > before:
            break
    else:
        pytest.fail("the bad and the good request never shared a batch in 5 tries")
    assert convert_page(docling_server, [good])[0] == expected  # still serving


@pytest.mark.parametrize(
    ("model", "payload", "message"),
    [
        (contract.DOCLING_ENDPOINT, b"this is not an image", "not an image"),
        (contract.DOCLING_ENDPOINT, "too_large", f"more than the limit of {MAX_PIXELS}"),
        (contract.DOCLING_ENDPOINT, b"", "IMAGE is empty"),
        (contract.DOCLING_DOCUMENT_ENDPOINT, "truncated", "not a readable PDF"),
        (contract.DOCLING_DOCUMENT_ENDPOINT, "no_pages", "PDF with no pages"),
        (contract.DOCLING_DOCUMENT_ENDPOINT, "too_many_pages", f"more than the limit of {MAX_PAGES}"),
        (contract.DOCLING_DOCUMENT_ENDPOINT, b"", "DOCUMENT is empty"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_server_carries_on(docling_server, model, payload, message) -> None:
    data = {
        "too_large": lambda: encoded(Image.new("RGB", (4000, 3100), "white")),
        "truncated": lambda: make_pdf((612, 792))[:400],
        "no_pages": empty_pdf,
        "too_many_pages": lambda: make_pdf(*[(100, 100)] * (MAX_PAGES + 1)),
    }
    body = data[payload]() if isinstance(payload, str) else payload
    with pytest.raises(InferenceServerException, match=message) as raised:
        if model == contract.DOCLING_ENDPOINT:
            convert_page(docling_server, [body])
        else:
            convert_document(docling_server, body)
    assert "INVALID_ARG" in str(raised.value.status())
    assert convert_page(docling_server, [encoded(noise_page(30, 200, 200))])[0][0]  # still serving


def test_the_vlm_is_a_compute_model_under_the_router(docling_server) -> None:
    convert_page(docling_server, [encoded(noise_page(40, 300, 300))])
    ledger = RouterControl(docling_server.server.grpc_url).status()
    vlm = ledger["models"][contract.DOCLING_VLM]
    assert vlm["state"] == "ready" and vlm["measured_bytes"] > 0
    assert sorted(vlm["endpoints"]) == [contract.DOCLING_ENDPOINT, contract.DOCLING_DOCUMENT_ENDPOINT]
