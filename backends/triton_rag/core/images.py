"""Client page images to RGB, once, before any model work: every mode Pillow opens.

What `docling` is sent can be in any mode Pillow reads: CMYK (JPEG and TIFF scans), 16-bit grayscale (I;16, PNG and
TIFF), 32-bit integer (I) and float (F) TIFFs, palette (P, PA), grayscale with alpha (LA), 1-bit (1), RGBA, YCbCr,
LAB, and multi-frame files (animated GIF, WebP and PNG, multi-page TIFF). The pipeline works on RGB only: the tiles,
and the page image docling-core keeps (it writes it as a PNG, which has no CMYK or float mode), so the image is
converted here, right after it is decoded, and the converted image is the only one used afterwards.

- Multi-frame: the first frame (a page image is one page).
- Alpha or a `transparency` entry: composited onto white (`core.idefics3.convert_to_rgb`, transformers' rule: a
  transparent background reads as paper).
- More than 8 bits per sample (I;16*, I, F): Pillow's own conversion clips at 255, which turns a 16-bit scan white,
  so these are scaled to 8 bits by the range their values are in: I;16* as 16-bit (0..65535 -> 0..255); I and F
  kept as they are when they lie within 0..255, F within 0..1 as 0..1, I within 0..65535 as 16-bit; anything else
  (negative values, larger ones) stretched from its minimum to its maximum. NaN reads as 0.
- Everything else: Pillow's conversion (CMYK, YCbCr, LAB, L, 1, P, RGB), as transformers does it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from triton_rag.core.errors import BadInput
from triton_rag.core.idefics3 import convert_to_rgb

#: Modes with more than 8 bits per sample: Pillow's conversion would clip them at 255.
DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def to_rgb(image: Image.Image, name: str = "IMAGE") -> Image.Image:
    """The RGB image the pipeline works on (see the module's rules); BadInput naming `name` and the mode when
    Pillow cannot convert it."""
    mode = image.mode
    try:
        if getattr(image, "n_frames", 1) > 1 and image.tell() != 0:
            image.seek(0)
        if mode in DEEP_MODES:
            image = _to_8bit(image)
        return convert_to_rgb(image)
    except Exception as exc:
        raise BadInput(f"{name} in mode {mode} cannot be converted to RGB: {exc}") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """Mode L from a deep single-band image, scaled by the range its values are in (the module's rules)."""
    values = np.array(image, dtype=np.float32)  # a copy, scaled in place below (a 40 Mpx page: 160 MB, once)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0.0 and high <= 1.0 and image.mode == "F":
            low, high = 0.0, 1.0
        elif low >= 0.0 and high <= 255.0:
            low, high = 0.0, 255.0
        elif low >= 0.0 and high <= 65535.0 and image.mode == "I":
            low, high = 0.0, 65535.0
        elif high == low:  # a flat image outside 0..255: mid-grey rather than a division by zero
            return Image.new("L", image.size, 128)
    values -= low
    values *= np.float32(255.0 / (high - low))
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8))
