"""triton_rag.core.idefics3 against transformers' own Idefics3 preprocessing (the PIL backend,
`Idefics3ImageProcessorPil`, and `Idefics3Processor`'s prompt expansion): the same tiles to 1e-5 after normalize
(bit-identical in practice), the same rows/cols and the same placeholder text, on pages, small, wide, tiny,
transparent, grayscale, palette and CMYK
images, with granite-docling's settings and a few others (no splitting, other sizes, other filter and mean/std).
CPU only, no hub: the prompt tests build a word-level tokenizer in place of granite's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from triton_rag.build.offline_docling import PREPROCESSOR_CONFIG
from triton_rag.core.idefics3 import (
    DEFAULT_CONFIG,
    ImageProcessorConfig,
    image_prompt,
    normalize,
    number_of_images,
    preprocess,
)

transformers = pytest.importorskip("transformers")

# granite-docling-258M's preprocessor_config.json, as shipped (the offline stand-in writes the same file).
GRANITE_PREPROCESSOR_CONFIG = PREPROCESSOR_CONFIG
TOLERANCE = 1e-5


# The transformers kwargs come from the json above, not from our config, so a wrong default in ImageProcessorConfig
# cannot hide by being fed to both sides.
GRANITE_KWARGS = {k: v for k, v in GRANITE_PREPROCESSOR_CONFIG.items() if not k.endswith(("_type", "_class"))}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# name -> (our config, transformers kwargs over granite's)
VARIANTS: dict[str, tuple[ImageProcessorConfig, dict[str, object]]] = {
    "granite": (DEFAULT_CONFIG, {}),
    "nosplit": (ImageProcessorConfig(do_image_splitting=False), {"do_image_splitting": False}),
    # Longest edge 512: small images are not split even with splitting on (rows = cols = 0, one 512x512 image).
    "longest512": (ImageProcessorConfig(longest_edge=512), {"size": {"longest_edge": 512}}),
    # Idefics3's own sizes (4 * 364, tiles of 364: not powers of two), BICUBIC and CLIP's mean/std.
    "tiles364": (
        ImageProcessorConfig(
            longest_edge=4 * 364, tile_size=364, image_seq_len=169, resample=3, mean=CLIP_MEAN, std=CLIP_STD
        ),
        {
            "size": {"longest_edge": 4 * 364},
            "max_image_size": {"longest_edge": 364},
            "resample": 3,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
        },
    ),
    # A longest edge that is not a multiple of the tile: resize_for_vision_encoder rounds 1000 up to 1024 and derives
    # the other side from it (1000x502 -> 1024x514 -> 1024x1024, 2x2 tiles), not from ceil(502 / 512) (1x2 tiles).
    "longest1000": (ImageProcessorConfig(longest_edge=1000), {"size": {"longest_edge": 1000}}),
}


def reference_processor(variant: str) -> object:
    """transformers' PIL-backend image processor with that variant's values."""
    return transformers.Idefics3ImageProcessorPil(**{**GRANITE_KWARGS, **VARIANTS[variant][1]})


def noisy_page(width: int, height: int, seed: int) -> Image.Image:
    """A white page with dark 'text' bars and noise: sharp edges and high frequencies, where resamplers differ."""
    rng = np.random.default_rng(seed)
    page = np.full((height, width, 3), 255, dtype=np.uint8)
    for top in range(height // 20, height - height // 20, max(height // 60, 4)):
        left = int(rng.integers(width // 20, width // 5))
        right = int(rng.integers(width // 2, width - width // 20))
        page[top : top + max(height // 150, 2), left:right] = rng.integers(0, 80, size=3, dtype=np.uint8)
    noise = rng.integers(-40, 41, size=page.shape)
    return Image.fromarray(np.clip(page.astype(np.int16) + noise, 0, 255).astype(np.uint8), "RGB")


def gradient(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour ramps plus noise: exercises every channel and value range."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1) + rng.normal(0, 20, size=(height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def rgba_with_transparency() -> Image.Image:
    """Opaque, half-transparent and fully transparent regions over coloured pixels: transparency must become white."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, size=(700, 900, 4), dtype=np.uint8)
    rgba[:, :300, 3] = 0
    rgba[:, 300:600, 3] = 128
    rgba[:, 600:, 3] = 255
    return Image.fromarray(rgba, "RGBA")


def grayscale() -> Image.Image:
    return noisy_page(850, 1100, seed=4).convert("L")


def palette() -> Image.Image:
    return gradient(640, 480, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)


def palette_with_transparency() -> Image.Image:
    """A palette PNG with a transparent index (info['transparency']), the other way PNGs carry transparency."""
    image = gradient(600, 800, seed=6).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    image.info["transparency"] = 0
    return image


def cmyk() -> Image.Image:
    return gradient(800, 600, seed=7).convert("CMYK")


IMAGES: dict[str, Callable[[], Image.Image]] = {
    "letter_page_1224x1584": lambda: noisy_page(1224, 1584, seed=0),
    "a4_page_1190x1684": lambda: noisy_page(1190, 1684, seed=1),
    "small_400x300_upscaled": lambda: gradient(400, 300, seed=2),
    "wide_2048x512": lambda: gradient(2048, 512, seed=8),
    "tiny_300x200": lambda: gradient(300, 200, seed=9),
    "rgba_transparent": rgba_with_transparency,
    "grayscale_L": grayscale,
    "palette_P": palette,
    "palette_P_transparency": palette_with_transparency,
    "cmyk": cmyk,
    "band_2000x1004": lambda: gradient(2000, 1004, seed=10),
}

CASES: list[tuple[str, str]] = [(name, "granite") for name in IMAGES if name != "band_2000x1004"] + [
    ("tiny_300x200", "nosplit"),
    ("letter_page_1224x1584", "nosplit"),
    ("tiny_300x200", "longest512"),
    ("wide_2048x512", "longest512"),
    ("a4_page_1190x1684", "tiles364"),
    ("rgba_transparent", "tiles364"),
    ("band_2000x1004", "longest1000"),
]


@pytest.mark.parametrize(("name", "variant"), CASES, ids=[f"{name}-{variant}" for name, variant in CASES])
def test_preprocess_matches_transformers(name: str, variant: str) -> None:
    config = VARIANTS[variant][0]
    image = IMAGES[name]()
    reference = reference_processor(variant)(images=[image], return_tensors="np", return_row_col_info=True)
    expected = np.asarray(reference["pixel_values"])[0]

    tiles = preprocess(image, config)
    assert tiles.pixels.dtype == np.uint8
    assert tiles.pixels.shape == expected.shape
    assert tiles.pixels.shape[1:] == (3, config.tile_size, config.tile_size)
    assert (tiles.rows, tiles.cols) == (reference["rows"][0][0], reference["cols"][0][0])
    assert np.asarray(reference["pixel_attention_mask"]).all()  # one image: no padding to mask

    actual = normalize(tiles.pixels, config)
    assert actual.dtype == np.float32
    assert float(np.abs(actual - expected).max()) <= TOLERANCE
    assert number_of_images(image.width, image.height, config) == (len(tiles.pixels), tiles.rows, tiles.cols)


@pytest.mark.parametrize(
    ("name", "rows", "cols"),
    [
        ("letter_page_1224x1584", 4, 4),
        ("a4_page_1190x1684", 4, 3),
        ("small_400x300_upscaled", 3, 4),
        ("wide_2048x512", 1, 4),
        ("tiny_300x200", 3, 4),
    ],
)
def test_grids_of_common_pages(name: str, rows: int, cols: int) -> None:
    """The grids docs/research/docling.md measured with transformers: a Letter page is 4x4 tiles + global, A4 4x3."""
    image = IMAGES[name]()
    tiles = preprocess(image)
    assert (tiles.rows, tiles.cols) == (rows, cols)
    assert tiles.pixels.shape == (rows * cols + 1, 3, 512, 512)


def test_transparency_becomes_white() -> None:
    """A fully transparent pixel reads as white paper (transformers composites onto white), not its hidden RGB."""
    rgba = np.zeros((600, 600, 4), dtype=np.uint8)
    rgba[..., :3] = 17  # dark colour under alpha 0
    pixels = preprocess(Image.fromarray(rgba, "RGBA")).pixels
    assert (pixels == 255).all()


def test_tiles_are_row_major_then_global() -> None:
    """Tile k is rows[k // cols], cols[k % cols] of the resized image; the global image comes last."""
    # 1536x1024 -> 2048x1366 -> 2048x1536: 3 rows x 4 cols; each tile's centre falls inside its own band of the input.
    width, height = 1536, 1024
    marks = np.zeros((height, width, 3), dtype=np.uint8)
    for row in range(3):
        for col in range(4):
            band = (slice(row * height // 3, (row + 1) * height // 3), slice(col * width // 4, (col + 1) * width // 4))
            marks[band] = (row * 4 + col) * 16
    tiles = preprocess(Image.fromarray(marks, "RGB"))
    assert (tiles.rows, tiles.cols) == (3, 4)
    for k in range(12):
        centre = tiles.pixels[k, :, 256, 256]
        assert (centre == k * 16).all(), (k, centre)
    assert len(np.unique(tiles.pixels[12, 0, ::64, ::64])) > 6  # the global image sees every tile


def test_normalize_is_exact_for_every_value() -> None:
    """All 256 uint8 values per channel, against transformers' rescale + normalize functions."""
    from transformers.image_transforms import normalize as hf_normalize
    from transformers.image_transforms import rescale as hf_rescale

    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :], (3, 1, 256)).copy()
    for config in (DEFAULT_CONFIG, VARIANTS["tiles364"][0]):
        rescaled = hf_rescale(
            values, config.rescale_factor, data_format="channels_first", input_data_format="channels_first"
        )
        expected = hf_normalize(rescaled, config.mean, config.std, input_data_format="channels_first")
        np.testing.assert_array_equal(normalize(values, config), expected)
        np.testing.assert_array_equal(normalize(values[None], config)[0], expected)  # a batch of tiles too


def test_config_from_granite_preprocessor_config() -> None:
    assert ImageProcessorConfig.from_preprocessor_config(GRANITE_PREPROCESSOR_CONFIG) == DEFAULT_CONFIG
    assert ImageProcessorConfig.from_preprocessor_config({**GRANITE_PREPROCESSOR_CONFIG, "image_seq_len": 64}) == (
        DEFAULT_CONFIG
    )
    custom = ImageProcessorConfig.from_preprocessor_config(
        {**GRANITE_PREPROCESSOR_CONFIG, "do_image_splitting": False, "resample": 3}, image_seq_len=81
    )
    assert (custom.do_image_splitting, custom.resample, custom.image_seq_len) == (False, 3, 81)
    with pytest.raises(ValueError, match="do_rescale"):
        ImageProcessorConfig.from_preprocessor_config({**GRANITE_PREPROCESSOR_CONFIG, "do_rescale": False})
    with pytest.raises(ValueError, match="longest_edge"):
        ImageProcessorConfig.from_preprocessor_config({**GRANITE_PREPROCESSOR_CONFIG, "size": {"height": 2048}})


@pytest.mark.parametrize(
    "size",
    [(1, 1), (1, 5000), (5000, 1), (511, 512), (512, 512), (513, 511), (1224, 1584), (1584, 1224), (4000, 3000)]
    + [(w, h) for w in (17, 333, 1000, 1537, 2049) for h in (29, 512, 1025, 1999, 3001)],
)
def test_number_of_images_matches_preprocess_sizes(size: tuple[int, int]) -> None:
    """On awkward sizes (odd, extreme aspect, just above/below a tile) for all configs, with cheap flat images and
    NEAREST resizes (sizes do not depend on the filter)."""
    width, height = size
    image = Image.new("RGB", (width, height), (40, 90, 200))
    for config, _ in VARIANTS.values():
        config = dataclasses.replace(config, resample=0)
        tiles = preprocess(image, config)
        assert number_of_images(width, height, config) == (len(tiles.pixels), tiles.rows, tiles.cols)


# --- prompt expansion -------------------------------------------------------------------------------------------

ROW_COL_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *ROW_COL_TOKENS]


def tiny_tokenizer() -> object:
    """A word-level fast tokenizer that knows the Idefics3 special tokens and "\\n": enough for Idefics3Processor to
    run offline (granite's real tokenizer is a hub download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "\n": 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer


@pytest.fixture(scope="module")
def processor() -> object:
    return transformers.Idefics3Processor(
        image_processor=reference_processor("granite"), tokenizer=tiny_tokenizer(), image_seq_len=64
    )


@pytest.mark.parametrize("rows", range(7))
def test_image_prompt_matches_replace_image_token(processor: object, rows: int) -> None:
    """Every grid the tokenizer has row/col tokens for, and the unsplit image, at two image_seq_len values."""
    for cols in range(7) if rows else [0]:
        inputs = {"rows": [[rows]], "cols": [[cols]]}
        assert image_prompt(rows, cols, DEFAULT_CONFIG) == processor.replace_image_token(inputs, image_idx=0)
    processor.image_seq_len = 169  # replace_image_token reads the attribute (not the call's image_seq_len)
    try:
        config = ImageProcessorConfig(image_seq_len=169)
        assert image_prompt(rows, 3, config) == processor.replace_image_token({"rows": [[rows]], "cols": [[3]]}, 0)
    finally:
        processor.image_seq_len = 64


@pytest.mark.parametrize("name", ["letter_page_1224x1584", "a4_page_1190x1684", "wide_2048x512"])
def test_image_prompt_matches_processor_call(processor: object, name: str) -> None:
    """End to end through Idefics3Processor.__call__: the replacement text, the token ids and the pixels."""
    image = IMAGES[name]()
    text = "<|start_of_role|>user<|end_of_role|><image>Convert this page to docling.<end_of_utterance>"
    out = processor(images=[image], text=[text], return_tensors="np", return_text_replacement_offsets=True)
    tiles = preprocess(image)
    prompt = image_prompt(tiles.rows, tiles.cols)
    assert out["text_replacement_offsets"][0][0]["replacement"] == prompt
    expanded = text.replace("<image>", prompt, 1)
    assert out["input_ids"][0].tolist() == processor.tokenizer(expanded)["input_ids"]
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"][0] == image_token_id).sum()) == len(tiles.pixels) * 64
    assert float(np.abs(normalize(tiles.pixels) - out["pixel_values"][0]).max()) <= TOLERANCE


def test_unsplit_prompt_through_processor() -> None:
    image = IMAGES["tiny_300x200"]()
    processor = transformers.Idefics3Processor(
        image_processor=reference_processor("nosplit"), tokenizer=tiny_tokenizer(), image_seq_len=64
    )
    out = processor(images=[image], text=["<image>Hi"], return_tensors="np", return_text_replacement_offsets=True)
    no_split = VARIANTS["nosplit"][0]
    tiles = preprocess(image, no_split)
    assert (tiles.rows, tiles.cols) == (0, 0)
    assert out["text_replacement_offsets"][0][0]["replacement"] == image_prompt(0, 0, no_split)
