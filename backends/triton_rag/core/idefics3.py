"""Idefics3 image preprocessing (granite-docling-258M) in numpy + PIL, without transformers.

It runs inside Triton python models, where importing transformers costs seconds and memory, so this re-implements
transformers' `Idefics3ImageProcessorPil` (5.24, `models/idefics3/image_processing_pil_idefics3.py`) and the
placeholder expansion of `Idefics3Processor.replace_image_token`; `tests/test_idefics3.py` checks both against
transformers. The steps, with transformers' arithmetic kept exactly (sizes go through the same float
divisions and `int()` truncations, so they agree on every input size):

1. RGB: an image with an alpha band or a `transparency` entry is composited onto white, anything else is
   `Image.convert("RGB")` (CMYK, L, P, ...).
2. Resize so the longest edge is `longest_edge` (2048), small images included; the other edge is
   `int(longest / aspect)` rounded up to even; then capped at 4096.
3. With image splitting: resize each side up to a multiple of `tile_size` (512), the second side through the aspect
   ratio of the new first side; if either side is then above `tile_size`, cut row-major `tile_size` tiles and append
   the whole image resized (squashed) to `tile_size` x `tile_size` as the global image; else the single image is kept
   (rows = cols = 0). Without splitting: one image squashed to `tile_size` x `tile_size`, rows = cols = 0.
4. Rescale by 1/255 (in float64, then float32) and normalize with mean/std (in float32).

Every resize goes through PIL on uint8 RGB, as transformers does (it converts its uint8 arrays to PIL images and back),
so steps 1-3 are exact in uint8 and `preprocess` stops there: the tiles travel 4x smaller than float32, and
`normalize` (step 4) can run later, on the device.

Batching is the caller's: transformers (`do_pad`) pads every sample of a batch to the same number of images with
all-zero float32 images (zero after normalize, which no uint8 pixel gives) and a zero `pixel_attention_mask`; the
model drops images that are exactly 0.0 everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# transformers' MAX_IMAGE_SIZE ("4k resolution as absolute maximum") in image_processing_pil_idefics3.py.
MAX_IMAGE_SIZE = 4096

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessing settings that matter; the defaults are granite-docling-258M's preprocessor_config.json and
    processor_config.json (image_seq_len), so the model works without reading them."""

    longest_edge: int = 2048  # size.longest_edge
    tile_size: int = 512  # max_image_size.longest_edge
    image_seq_len: int = 64  # <image> tokens per tile (processor_config.json)
    resample: int = 1  # PIL.Image.Resampling.LANCZOS
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_image_splitting: bool = True

    def __post_init__(self) -> None:
        """Fail at load time, not on the first request."""
        if self.longest_edge < 1 or self.tile_size < 1 or self.image_seq_len < 1:
            raise ValueError(f"longest_edge, tile_size and image_seq_len must be positive: {self}")
        Image.Resampling(self.resample)  # ValueError for an unknown filter
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB): {self}")

    @classmethod
    def from_preprocessor_config(
        cls, config: Mapping[str, Any], image_seq_len: int | None = None
    ) -> ImageProcessorConfig:
        """From a preprocessor_config.json dict. `image_seq_len` lives in processor_config.json: pass it, or merge it
        into `config`; else the default (64) stays. Settings this module does not implement (a switched-off resize,
        rescale, normalize or RGB conversion, sizes given as height/width) raise instead of being silently ignored."""
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not config.get(flag, True):
                raise ValueError(f"{flag}=false is not supported by triton_rag.core.idefics3")
        size = config.get("size", {"longest_edge": cls.longest_edge})
        max_image_size = config.get("max_image_size", {"longest_edge": cls.tile_size})
        if "longest_edge" not in size or "longest_edge" not in max_image_size:
            raise ValueError(f"size and max_image_size need longest_edge, got {size} and {max_image_size}")
        seq_len = image_seq_len if image_seq_len is not None else config.get("image_seq_len", cls.image_seq_len)
        mean = config.get("image_mean", cls.mean)
        std = config.get("image_std", cls.std)
        if isinstance(mean, (int, float)):
            mean = [mean] * 3
        if isinstance(std, (int, float)):
            std = [std] * 3
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {mean} and {std}")
        return cls(
            longest_edge=int(size["longest_edge"]),
            tile_size=int(max_image_size["longest_edge"]),
            image_seq_len=int(seq_len),
            resample=int(config.get("resample", cls.resample)),
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
            rescale_factor=float(config.get("rescale_factor", cls.rescale_factor)),
            do_image_splitting=bool(config.get("do_image_splitting", cls.do_image_splitting)),
        )


DEFAULT_CONFIG = ImageProcessorConfig()


@dataclass(frozen=True)
class Tiles:
    """One image ready for the vision encoder, before rescale/normalize.

    `pixels` is uint8 [num_images, 3, tile, tile]: the tiles row-major, then the global image last; a single image when
    rows = cols = 0. uint8 because every transformers step before the rescale is uint8 PIL work, so nothing is lost,
    and it is 4x smaller than float32 on the wire; `normalize` gives the model's float32 input."""

    pixels: np.ndarray
    rows: int
    cols: int


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' `convert_to_rgb` does it: transparency is composited onto white (a transparent
    background reads as paper, not black); other modes take PIL's own conversion."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """transformers' `_resize_output_size_rescale_to_max_len`: longest edge to max_len (up or down), the other
    through the aspect ratio, truncated then rounded up to even."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    else:
        height = max_len
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def _scale_below_upper_bound(height: int, width: int, max_len: int) -> tuple[int, int]:
    """transformers' `_resize_output_size_scale_below_upper_bound`: only shrinks, no even rounding."""
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def _resized_size(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
    """(height, width) after the `size.longest_edge` resize (step 2)."""
    height, width = _rescale_to_max_len(height, width, config.longest_edge)
    return _scale_below_upper_bound(height, width, MAX_IMAGE_SIZE)


def _vision_encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' `resize_for_vision_encoder`: each side up to a multiple of `tile`; the second side goes through
    the aspect ratio of the already rounded first side (not simply ceil(side / tile)), as transformers does."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect_ratio)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect_ratio)
        width = math.ceil(width / tile) * tile
    return height, width


def _grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of `split_images` for an image of that size; (0, 0) when it fits one tile (not split)."""
    if height > tile or width > tile:
        return (height - tile) // tile + 1, (width - tile) // tile + 1
    return 0, 0


def number_of_images(width: int, height: int, config: ImageProcessorConfig = DEFAULT_CONFIG) -> tuple[int, int, int]:
    """(num_images, rows, cols) that `preprocess` gives for an image of that PIL size (width first), without pixels:
    to check limits (tokens = num_images * image_seq_len + separators) before decoding or resizing anything.

    Unlike transformers' `get_number_of_image_patches`, which says 0 images for an unsplit image and takes a
    shortcut for the second side, this follows the preprocessing path, so it always agrees with `preprocess`."""
    if width < 1 or height < 1:
        raise ValueError(f"empty image: {width}x{height}")
    if not config.do_image_splitting:
        return 1, 0, 0
    h, w = _resized_size(height, width, config)
    h, w = _vision_encoder_size(h, w, config.tile_size)
    rows, cols = _grid(h, w, config.tile_size)
    return (rows * cols + 1 if rows or cols else 1), rows, cols


def _chw(image: Image.Image) -> np.ndarray:
    """uint8 [3, H, W] of an RGB image."""
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def preprocess(image: Image.Image, config: ImageProcessorConfig = DEFAULT_CONFIG) -> Tiles:
    """Tiles (uint8, not yet normalized) and the grid of one page image, as `Idefics3ImageProcessorPil` makes them.

    Sizes come from the image's own pixels; EXIF orientation is not applied (transformers applies it only when it
    loads a path or URL itself, not to a PIL image it is given)."""
    rgb = convert_to_rgb(image)
    width, height = rgb.size
    if width < 1 or height < 1:
        raise ValueError(f"empty image: {width}x{height}")
    resample = Image.Resampling(config.resample)
    tile = config.tile_size
    h, w = _resized_size(height, width, config)
    resized = rgb.resize((w, h), resample=resample)
    if not config.do_image_splitting:
        square = resized.resize((tile, tile), resample=resample)
        return Tiles(pixels=_chw(square)[None].copy(), rows=0, cols=0)
    h, w = _vision_encoder_size(h, w, tile)
    resized = resized.resize((w, h), resample=resample)
    rows, cols = _grid(h, w, tile)
    if rows == 0 and cols == 0:
        return Tiles(pixels=_chw(resized)[None].copy(), rows=0, cols=0)
    hwc = np.asarray(resized, dtype=np.uint8)[: rows * tile, : cols * tile]
    tiles = hwc.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, tile, tile)
    global_image = _chw(resized.resize((tile, tile), resample=resample))
    return Tiles(pixels=np.concatenate([tiles, global_image[None]]), rows=rows, cols=cols)


def normalize(pixels: np.ndarray, config: ImageProcessorConfig = DEFAULT_CONFIG) -> np.ndarray:
    """uint8 [..., 3, H, W] -> the model's float32 input, (x * rescale_factor - mean) / std.

    Same dtypes and order as transformers (`rescale`: float64 multiply then cast to float32; `normalize`: float32
    subtract and divide), so the result is bit-identical; a device port should keep the float32 steps."""
    if pixels.ndim < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"expected [..., 3, H, W], got shape {pixels.shape}")
    rescaled = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(config.std, dtype=np.float32)[:, None, None]
    normalized: np.ndarray = (rescaled - mean) / std
    return normalized


def image_prompt(rows: int, cols: int, config: ImageProcessorConfig = DEFAULT_CONFIG) -> str:
    """The text that replaces one "<image>" in the prompt, as `Idefics3Processor.replace_image_token` writes it.

    Split: per tile <fake_token_around_image><row_i_col_j> then image_seq_len <image>, a "\\n" after each row, then
    "\\n" and the global image. Unsplit: just the global image. The token count must match the tiles exactly."""
    image_tokens = IMAGE_TOKEN * config.image_seq_len
    global_image = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image_tokens}{FAKE_IMAGE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_image
    parts: list[str] = []
    for row in range(rows):
        parts.extend(f"{FAKE_IMAGE_TOKEN}<row_{row + 1}_col_{col + 1}>{image_tokens}" for col in range(cols))
        parts.append("\n")
    parts.append("\n")
    parts.append(global_image)
    return "".join(parts)
