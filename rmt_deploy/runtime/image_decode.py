"""One image decoder for every path: a file or encoded bytes -> a loaded RGB PIL image, at bounded cost.

`rmt-deploy predict`, `Engine.predict`, the Triton model, the Ray app and the trainer's loader all
decode here, so one file gives one set of pixels everywhere. RGB first, as open_clip's training
data is decoded (webdataset's "pilrgb"): the transform then resizes RGB pixels whatever the file
held (a palette image is not resized with nearest-neighbour, RGBA not with premultiplied alpha).
16-bit grey is scaled to 8 bits (Pillow's own conversion clips every value above 255 to white);
alpha is dropped, as Image.convert("RGB") does.

Cost: a file is checked to be a regular file of at most `max_file_bytes`, and its header's size
against `max_pixels` / `max_side` before any pixel is decoded. Decoding then holds at most
DECODE_BYTES_PER_PIXEL bytes per decoded pixel (Pillow keeps RGB and RGBA as 4 bytes a pixel:
the decoded image, its RGB copy, and for 16-bit or 32-bit grey an 8-bit step) besides the encoded
bytes; the transform (preprocess) adds at most 4 bytes x crop width x source height and its
output (tests/runtime/test_image_memory.py measures both with peak RSS).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from rmt_deploy.artifacts.integrity import open_regular_file
from rmt_deploy.errors import InputError, RmtError

__all__ = ["DecodeLimits", "DECODE_BYTES_PER_PIXEL", "decode_image", "load_image", "to_rgb"]

DECODE_BYTES_PER_PIXEL = 10  # the decoded image (<= 4 B/px in Pillow) + its RGB copy (4 B/px) + a grey step
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on one image file: its size on disk, its decoded pixels and its longest side."""

    max_file_bytes: int = 256 << 20
    max_pixels: int = 8192 * 8192  # 64 M pixels: at most 640 MiB while decoding (10 B/px)
    max_side: int = 65536

    def check(self, width: int, height: int, what: str) -> None:
        """InputError unless a width x height image is non-empty and within these limits."""
        if width < 1 or height < 1:
            raise InputError(f"{what} is empty ({width}x{height} pixels)")
        if max(width, height) > self.max_side or width * height > self.max_pixels:
            raise InputError(f"{what} is {width}x{height} pixels, more than the limit of {self.max_pixels:,} "
                             f"pixels ({self.max_side:,} per side): send a smaller image")


def load_image(path: str | os.PathLike, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """An image file -> a loaded RGB PIL image; InputError names the file (missing, a directory, a FIFO,
    too large, undecodable)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image file {str(path)!r} does not exist")
    with open_regular_file(path, limits.max_file_bytes, "image", InputError) as handle:
        return decode_image(handle, f"image {str(path)!r}", lambda w, h: limits.check(w, h, f"image {str(path)!r}"))


def decode_image(source: bytes | io.RawIOBase | io.BufferedIOBase, what: str,
                 check_size: Callable[[int, int], None], formats: Sequence[str] | None = None,
                 error: type[RmtError] = InputError,
                 on_bomb: Callable[[str], RmtError] | None = None) -> Image.Image:
    """Encoded image bytes (or an open file) -> a loaded RGB PIL image. `check_size(width, height)`
    sees the header's size before any pixel is decoded; `formats` restricts Pillow's decoders;
    `on_bomb(detail)` builds the error for a header past Pillow's own bound (checked while opening)."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(stream, formats=formats) as image:
            check_size(*image.size)
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError:
        kinds = f"a {', '.join(formats)} file" if formats else "an image file Pillow can read"
        raise error(f"cannot read {what}: it is not {kinds}") from None
    except Image.DecompressionBombError as exc:  # Pillow's own bound, checked while opening
        detail = str(exc).split(" exceeds")[0]
        if on_bomb is not None:
            raise on_bomb(detail) from None
        raise error(f"cannot read {what}: it declares too many pixels ({detail}): send a smaller image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise error(f"cannot read {what}: it cannot be decoded ({type(exc).__name__}: {str(exc)[:200]})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB (itself when it already is): 16-bit grey scaled to 8 bits, alpha dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        grey = (np.asarray(image) >> 8).astype(np.uint8)  # the high byte: 0..65535 -> 0..255
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")
