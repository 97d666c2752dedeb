"""The docling pipeline's parts without a server: the offline granite-docling tokenizer, our VLM engine against
transformers' `generate` on the same weights, page prompts against Idefics3Processor, PDF rendering and its limits."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tests.harness import CACHE_DIR
from triton_rag.build.footprint import totals, vlm_footprints, vlm_shape
from triton_rag.build.offline_docling import build_granite_tokenizer
from triton_rag.build.settings import SettingsError, load_settings
from triton_rag.core.docling_prompt import GRANITE_CHAT, PagePrompts
from triton_rag.core.idefics3 import ImageProcessorConfig, normalize, preprocess
from triton_rag.core.images import to_rgb
from triton_rag.core.pdf import Limits, open_image, render_pdf, render_scale, rendered_size
from triton_rag.core.text import InputError
from triton_rag.engines.torch_vlm import PageInput, TorchVlm

#: sha256 of granite-docling-258M's own vocab.json (tokens by id) + merges.txt, as published on 2026-11-27.
GRANITE_VOCAB_SHA256 = "7de6b917a76eeed7aa926fd72e200d95105952ff4d30c35a931890bd1b5a35be"
PROMPT = "Convert this page to docling."
NEW_TOKENS = 24


def noise_page(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def make_pdf(*sizes: tuple[int, int]) -> bytes:
    """A PDF of pages of the given sizes in points, each with a drawn block (written by Pillow)."""
    images = []
    for index, (width, height) in enumerate(sizes):
        page = Image.new("RGB", (width, height), "white")
        page.paste((20 * index, 40, 90), (width // 4, height // 4, width // 2, height // 3))
        images.append(page)
    buffer = io.BytesIO()
    images[0].save(buffer, "PDF", resolution=72.0, save_all=True, append_images=images[1:])
    return buffer.getvalue()


#: The image modes (and multi-frame files) a client may send to `docling`, each in a format that keeps it.
IMAGE_MODES = ("CMYK", "F", "I;16", "I", "P", "PA", "LA", "L", "1", "RGBA", "animated GIF", "animated PNG")


def page_in_mode(mode: str, width: int = 96, height: int = 64) -> bytes:
    """An encoded page image in `mode`: a left-to-right gradient (deep modes over their whole range), transparent
    on its left quarter where the mode has alpha; animated: a red first frame, then green and blue."""
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float64)[None, :].repeat(height, axis=0)
    rgb = Image.fromarray(np.stack([ramp * 255, ramp[::-1] * 255, np.full_like(ramp, 90)], -1).astype(np.uint8))
    buffer = io.BytesIO()
    if mode.startswith("animated"):
        frames = [Image.new("RGB", (width, height), colour) for colour in ("red", "green", "blue")]
        frames[0].save(buffer, mode.split()[1], save_all=True, append_images=frames[1:])
        return buffer.getvalue()
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF", "PA": "TIFF"}.get(mode, "PNG")
    if mode == "F":
        image = Image.fromarray(ramp.astype(np.float32))  # 0.0 .. 1.0
    elif mode in ("I;16", "I"):
        image = Image.fromarray((ramp * 65535).round().astype(np.uint16 if mode == "I;16" else np.int32))
    elif mode in ("PA", "LA", "RGBA"):
        image = rgb.convert("P" if mode == "PA" else mode[:-1]).convert(mode)
        alpha = np.full((height, width), 255, dtype=np.uint8)
        alpha[:, : width // 4] = 0
        image.putalpha(Image.fromarray(alpha))
    else:
        image = rgb.convert(mode)
    image.save(buffer, fmt)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == mode  # the file really is in that mode
    return buffer.getvalue()


def empty_pdf() -> bytes:
    """A well-formed PDF whose page tree is empty (PDFium refuses to open it)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 3\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size 3 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


@pytest.fixture(scope="module")
def tokenizer(tiny_docling_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_docling_dir))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> PagePrompts:
    return PagePrompts(tokenizer, PROMPT, ImageProcessorConfig(), eos_token_id=100257)


@pytest.fixture(scope="module")
def reference(tiny_docling_dir: Path):
    """transformers' own Idefics3 model and processor on the same weights (the model card's recipe)."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(str(tiny_docling_dir), dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(str(tiny_docling_dir))


@pytest.fixture(scope="module")
def pages() -> list[Image.Image]:
    return [noise_page(0, 612, 792), noise_page(1, 842, 595), noise_page(2, 300, 200)]


def reference_generate(reference, image: Image.Image, stop_ids: list[int] | None) -> list[int]:
    model, processor = reference
    inputs = processor(text=GRANITE_CHAT.format(prompt=PROMPT), images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop_ids, pad_token_id=100257
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def page_input(prompts: PagePrompts, image: Image.Image) -> PageInput:
    tiles = preprocess(image)
    return PageInput(tiles.pixels, prompts.encode(tiles))


def test_the_offline_tokenizer_is_granite_doclings_own(tmp_path: Path) -> None:
    directory = build_granite_tokenizer(tmp_path / "tokenizer", CACHE_DIR, log=lambda _: None)
    vocab = json.loads((directory / "vocab.json").read_text())
    lines = (directory / "merges.txt").read_text().split("\n")
    merges = [line for line in lines if line and not line.startswith("#version")]
    canonical = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False).encode()
    canonical += b"\n".join(merge.encode() for merge in merges)
    assert hashlib.sha256(canonical).hexdigest() == GRANITE_VOCAB_SHA256
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<image>", "</doctag>", "<global-img>")}
    assert ids == {"<|end_of_text|>": 100257, "<image>": 100270, "</doctag>": 100328, "<global-img>": 100340}
    # <loc_N> is plain text in granite-docling (5 tokens), unlike SmolDocling's single tokens
    assert tokenizer("<loc_123>", add_special_tokens=False)["input_ids"] == [27, 1092, 62, 4513, 29]
    text = "<doctag><text><loc_30><loc_50>naïve café 東京 it's</text></doctag>"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=False) == text


def test_page_prompt_ids_equal_idefics3_processor(prompts: PagePrompts, reference, pages) -> None:
    _, processor = reference
    for image in pages:
        expected = processor(text=GRANITE_CHAT.format(prompt=PROMPT), images=[image], return_tensors="np")
        tiles = preprocess(image)
        assert prompts.encode(tiles).tolist() == expected["input_ids"][0].tolist()
        assert np.abs(normalize(tiles.pixels) - expected["pixel_values"][0]).max() <= 1e-5


def test_stop_tokens_and_decoding(prompts: PagePrompts, tokenizer) -> None:
    assert prompts.stop_ids == (100257, 100328)  # <|end_of_text|>, </doctag>; <end_of_utterance> is not in vocab
    tags = "<doctag><text><loc_1><loc_2><loc_3><loc_4>Hello</text></doctag>"
    ids = tokenizer(tags, add_special_tokens=False)["input_ids"]
    assert prompts.decode(ids) == tags  # </doctag> is part of the DocTags
    assert prompts.decode([*ids[:-1], 100257]) == tags.removesuffix("</doctag>")  # eos is not
    with pytest.raises(ValueError, match="exactly one <image>"):
        tokenizer.chat_template = "{{ messages[0]['content'][1]['text'] }}"
        try:
            PagePrompts(tokenizer, PROMPT, ImageProcessorConfig())
        finally:
            tokenizer.chat_template = None


def test_engine_generates_what_transformers_generates(tiny_docling_dir: Path, prompts, reference, pages) -> None:
    engine = TorchVlm(tiny_docling_dir, dtype="float32", device="cpu", use_graphs=False)
    inputs = [page_input(prompts, image) for image in pages]
    alone = [engine.generate([page], NEW_TOKENS, ())[0] for page in inputs]
    for image, ours in zip(pages, alone, strict=True):
        assert ours == reference_generate(reference, image, None)
        assert len(set(ours)) > NEW_TOKENS // 2  # varied output, or this comparison would prove little
    assert engine.generate(inputs, NEW_TOKENS, ()) == alone  # alone and inside a batch agree
    # the static-buffer path (what CUDA graphs capture), replayed eagerly here, decodes the same ids
    assert TorchVlm(tiny_docling_dir, "float32", "cpu", use_graphs=True).generate(inputs, NEW_TOKENS, ()) == alone


def test_generation_stops_at_a_stop_token_and_at_each_rows_limit(tiny_docling_dir: Path, prompts, reference, pages):
    inputs = [page_input(prompts, image) for image in pages]
    for use_graphs in (False, True):
        engine = TorchVlm(tiny_docling_dir, dtype="float32", device="cpu", use_graphs=use_graphs)
        free = engine.generate(inputs, NEW_TOKENS, ())
        stop = free[1][6]  # pretend the 7th token of page 2 ends generation
        stopped = engine.generate(inputs, NEW_TOKENS, (stop,))
        for full, cut in zip(free, stopped, strict=True):
            end = full.index(stop) + 1 if stop in full else NEW_TOKENS
            assert cut == full[:end]
        assert stopped[1] == reference_generate(reference, pages[1], [stop])
        assert [len(ids) for ids in engine.generate(inputs, [3, 9, 1], ())] == [3, 9, 1]


def test_engine_rejects_malformed_pages(tiny_docling_dir: Path, prompts, pages) -> None:
    engine = TorchVlm(tiny_docling_dir, dtype="float32", device="cpu")
    page = page_input(prompts, pages[0])
    cases = {
        "pixels must be uint8": PageInput(page.pixels.astype(np.float32), page.input_ids),
        "image tokens": PageInput(page.pixels[:-1], page.input_ids),
        "token ids must lie": PageInput(page.pixels, np.append(page.input_ids, 10**6)),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            engine.generate([bad], 4, ())
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([page], 0, ())


def test_pdf_pages_render_at_the_configured_resolution_with_sizes_in_points() -> None:
    pages = render_pdf(make_pdf((612, 792), (842, 595)), Limits())
    assert [(p.number, p.size_points, p.image.size, p.error) for p in pages] == [  # type: ignore[union-attr]
        (1, (612.0, 792.0), (1224, 1584), ""),
        (2, (842.0, 595.0), (1684, 1190), ""),
    ]
    poster = render_pdf(make_pdf((2000, 2000)), Limits(max_image_pixels=1_000_000))[0]
    assert poster.image is not None and poster.image.size[0] * poster.image.size[1] <= 1_000_000
    assert poster.size_points == (2000.0, 2000.0)  # rendered smaller, still reported in points


@given(
    width=st.floats(0.5, 20_000.0),
    height=st.floats(0.5, 20_000.0),
    dpi=st.floats(1.0, 1200.0),
    limit=st.integers(1, 200_000_000),
)
def test_pages_render_at_the_largest_size_that_fits_the_pixel_limit(width, height, dpi, limit) -> None:
    size, limits = (width, height), Limits(max_image_pixels=limit, dpi=dpi)
    scale = render_scale(size, limits)
    columns, rows = rendered_size(size, scale)
    assert columns * rows <= limit  # never over: docling's pixel check would refuse the page
    if scale == dpi / 72.0:
        return  # a page that fits at dpi is rendered at dpi
    assert scale < dpi / 72.0
    bigger = rendered_size(size, math.nextafter(scale, math.inf))
    assert bigger[0] * bigger[1] > limit  # the largest that fits: one float step more and it does not
    assert (columns + 1) * (rows + 1) > limit  # so within a pixel of the largest, on each side


def test_a_poster_page_renders_to_fit_the_limit_exactly() -> None:
    # 3100 pt at 144 dpi is 6200 px a side; 12 Mpx allow 3464.1: 3464 (rounding up, 3465^2, is over the limit)
    limits = Limits(max_image_pixels=12_000_000)
    assert rendered_size((3100.0, 3100.0), render_scale((3100.0, 3100.0), limits)) == (3464, 3464)
    (page,) = render_pdf(make_pdf((3100, 3100)), limits)
    assert page.error == "" and page.image is not None and page.image.size == (3464, 3464)
    assert page.size_points == (3100.0, 3100.0)
    # the case: sqrt(40M) = 6324.6 px a side; and a non-square poster (A0 at 300 dpi)
    for size, dpi in [((3200.0, 3200.0), 144.0), ((2384.0, 3370.0), 300.0)]:
        columns, rows = rendered_size(size, render_scale(size, Limits(dpi=dpi)))
        assert 40_000_000 - (columns + rows) < columns * rows <= 40_000_000


def test_every_image_mode_becomes_rgb_once_when_it_is_opened() -> None:
    width, height = 96, 64
    ramp = np.rint(np.linspace(0.0, 1.0, width) * 255)  # what every deep gradient must become: 0 .. 255
    for mode in IMAGE_MODES:
        data = page_in_mode(mode, width, height)
        image = open_image(data, Limits())
        assert (image.mode, image.size) == ("RGB", (width, height)), mode
        pixels = np.asarray(image).astype(int)
        if mode in ("F", "I;16", "I"):  # scaled from their range to 8 bits, not clipped at 255 (a white page)
            assert np.abs(pixels[0, :, 0] - ramp).max() <= 1, mode
            assert (pixels[..., 0] == pixels[..., 1]).all(), mode
        elif mode in ("PA", "LA", "RGBA"):  # transparency composited onto white
            assert (pixels[:, : width // 4] == 255).all() and pixels[:, width // 2 :].min() < 255, mode
        elif mode.startswith("animated"):  # the first frame
            assert (pixels == [255, 0, 0]).all(), mode
        else:  # CMYK, P, L, 1: Pillow's own conversion, as transformers does it
            assert (pixels == np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).all(), mode
        assert to_rgb(image) is image  # RGB stays as it is: converted once
    # values outside 0..255 (and 0..1 for F, 0..65535 for I): stretched from the minimum to the maximum
    signed = to_rgb(Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32)))
    assert np.asarray(signed)[0, :, 0].tolist() == [0, 128, 255]
    floats = to_rgb(Image.fromarray(np.array([[0.0, 127.6, 255.0, np.nan]], dtype=np.float32)))
    assert np.asarray(floats)[0, :, 0].tolist() == [0, 128, 255, 0]


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        (b"", Limits(), "DOCUMENT is empty"),
        (b"this is not a pdf", Limits(), "not a readable PDF"),
        (make_pdf((612, 792))[:300], Limits(), "not a readable PDF"),
        (empty_pdf(), Limits(), "PDF with no pages"),
        (make_pdf(*[(200, 200)] * 3), Limits(max_pages=2), "3 pages, more than the limit of 2"),
        (make_pdf((200, 200)), Limits(max_document_bytes=100), "more than the limit of 100"),
    ],
)
def test_bad_pdfs_are_refused_clearly(data: bytes, limits: Limits, message: str) -> None:
    with pytest.raises(InputError, match=message):
        render_pdf(data, limits)


def test_page_images_are_checked_before_decoding() -> None:
    png = io.BytesIO()
    noise_page(3, 40, 30).save(png, "PNG")
    assert open_image(png.getvalue(), Limits()).size == (40, 30)
    with pytest.raises(InputError, match="not an image"):
        open_image(b"GIF89a but not really", Limits())
    with pytest.raises(InputError, match="1200 pixels, more than the limit of 1000"):
        open_image(png.getvalue(), Limits(max_image_pixels=1000))
    with pytest.raises(InputError, match="cannot be decoded"):
        open_image(png.getvalue()[: len(png.getvalue()) // 2], Limits())
    with pytest.raises(InputError, match="empty"):
        open_image(b"", Limits())


def test_vlm_footprint_counts_weights_kv_cache_and_vision_activations(tiny_docling_dir: Path) -> None:
    config = json.loads((tiny_docling_dir / "config.json").read_text())
    shape = vlm_shape(tiny_docling_dir, config)
    one = totals(vlm_footprints(shape, "auto", pages=1, max_tokens=1000))
    two = totals(vlm_footprints(shape, "auto", pages=2, max_tokens=1000))
    text, vision = config["text_config"], config["vision_config"]
    kv_per_page = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 1000
    vision_per_page = 17 * 1024 * (3 * vision["hidden_size"] + vision["intermediate_size"])
    assert two["cpu"] - one["cpu"] == 4 * (kv_per_page + vision_per_page)  # auto: float32 on the CPU
    assert two["gpu"] - one["gpu"] == 2 * (kv_per_page + vision_per_page)  # bfloat16 on a GPU


def test_docling_settings(tmp_path: Path) -> None:
    path = tmp_path / "rag.toml"
    path.write_text('[docling]\nmodel = "/models/granite-docling-258M"\nmax_new_tokens = 4096\ndpi = 100\n')
    settings = load_settings(path, ["docling.max_pages=10"])
    assert (settings.docling.max_new_tokens, settings.docling.dpi, settings.docling.max_pages) == (4096, 100.0, 10)
    with pytest.raises(SettingsError, match="unknown keys"):
        load_settings(path, ["docling.max_tokens=5"])
    with pytest.raises(SettingsError, match="positive"):
        load_settings(path, ["docling.max_pages=0"])


def test_image_embeddings_from_a_separate_vision_model_give_the_same_ids(tiny_docling_dir: Path, prompts, pages):
    """The tensorrt_plan variant computes the tower's output elsewhere (docling_vision) and hands it over."""
    engine = TorchVlm(tiny_docling_dir, dtype="float32", device="cpu")
    page = page_input(prompts, pages[1])
    embeds = engine.image_features(page.pixels).numpy().reshape(len(page.pixels), engine.image_seq_len, -1)
    handed_over = PageInput(page.pixels, page.input_ids, embeds)
    assert engine.generate([handed_over], NEW_TOKENS, ()) == engine.generate([page], NEW_TOKENS, ())
    with pytest.raises(ValueError, match="image embeds must be"):
        engine.generate([PageInput(page.pixels, page.input_ids, embeds[:, :10])], 4, ())
