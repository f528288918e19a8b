"""open_clip's eval transform in numpy + Pillow (no torch), on RGB images from one decoder.

Images are decoded and converted to RGB first (runtime.image_decode: the decoder every path
shares), then resized and cropped with open_clip's `image_transform(..., is_train=False)` steps
and rounding: resize (Pillow, antialiased; bicubic whatever the configured interpolation for
"shortest" on a non-square size, as open_clip does), center crop (zero padding where the image
is smaller), scale to [0, 1], then (x - mean) / std in float32. Where the resized image would hold
more than BOX_RESIZE_AREA times the crop's pixels (extreme aspect ratios: 1 x 16384 at 224 px would
be 224 x 3.7 M), only the window the crop keeps is resized (Pillow's box resize, sampling the source
where the full resize would; within one 8-bit level of it), so any shape costs what a square one
does. `to_batch` turns what a user passes to `Engine.predict` into one
validated float32 NCHW batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.image_decode import DecodeLimits, decode_image, load_image, to_rgb

__all__ = ["ImageTransform", "load_image", "to_batch", "MAX_ABS_INPUT"]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "random": Image.Resampling.BICUBIC}  # open_clip evaluates 'random' as bicubic
_RESIZE_MODES = ("shortest", "longest", "squash")
# a preprocessed batch holds (pixel / 255 - mean) / std: a few units for any usual mean and std;
# values beyond this are not an image (and 3e38 overflows to NaN inside the model)
MAX_ABS_INPUT = 1e4
BOX_RESIZE_AREA = 4  # resized / crop pixels above which only the kept window is resized


@dataclass(frozen=True)
class ImageTransform:
    """open_clip's eval transform for one base: size [H, W], mean, std, interpolation, resize mode."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise InputError(f"interpolation {self.interpolation!r} is not one of {', '.join(_RESAMPLE)}")
        if self.resize_mode not in _RESIZE_MODES:
            raise InputError(f"resize mode {self.resize_mode!r} is not one of {', '.join(_RESIZE_MODES)}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise InputError(f"image size {self.image_size!r} must be [height, width] >= 1")

    @classmethod
    def from_config(cls, cfg: Any) -> "ImageTransform":
        """From a bundle manifest's Preprocess (or any object with the same fields)."""
        size = cfg.image_size
        size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        return cls(size, tuple(float(m) for m in cfg.mean), tuple(float(s) for s in cfg.std),
                   str(cfg.interpolation), str(cfg.resize_mode))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> float32 [3, H, W], normalised (RGB first, then resize and crop)."""
        width, height = image.size
        if width < 1 or height < 1:
            raise InputError(f"image is empty ({width}x{height} pixels)")
        size, resample = self._resized_size(width, height)
        image = _resize_and_crop(to_rgb(image), size, resample, self.image_size)
        pixels = np.asarray(image, dtype=np.float32)
        pixels /= np.float32(255.0)
        pixels -= np.asarray(self.mean, np.float32)
        pixels /= np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _resized_size(self, w: int, h: int) -> tuple[list[int], Image.Resampling]:
        """The [height, width] open_clip resizes a w x h image to (each at least 1), and the filter."""
        height, width = self.image_size
        resample = _RESAMPLE[self.interpolation]
        if self.resize_mode == "squash":
            size = [height, width]
        elif self.resize_mode == "shortest" and height == width:
            # torchvision Resize(int): the short edge becomes `height`, the long one is truncated.
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = height, int(height * long / short)
            size = [new_long, new_short] if w <= h else [new_short, new_long]
        else:
            size = _keep_ratio_size((h, w), self.image_size, longest=self.resize_mode == "longest")
            if self.resize_mode == "shortest":
                # open_clip builds ResizeKeepRatio(image_size) here without passing the interpolation
                resample = Image.Resampling.BICUBIC
        return [max(1, side) for side in size], resample


def _keep_ratio_size(source: tuple[int, int], target: tuple[int, int], longest: bool) -> list[int]:
    """open_clip ResizeKeepRatio: [h, w] scaled to fit the target's shortest (or longest) edge ratio."""
    ratio_h, ratio_w = source[0] / target[0], source[1] / target[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return [round(source[0] * 1.0 / ratio), round(source[1] * 1.0 / ratio)]


def _crop_start(size: int, crop: int) -> int:
    """torchvision center_crop's first kept index along one side (negative: zero padding before)."""
    return -((crop - size) // 2) if crop > size else int(round((size - crop) / 2.0))


def _resize_and_crop(image: Image.Image, size: list[int], resample: Image.Resampling,
                     crop: tuple[int, int]) -> Image.Image:
    """Resize to `size` [h, w], then center crop to `crop` [h, w] (zero padding where smaller), resizing
    only the kept window: the box resize samples the source where the full resize would."""
    (new_h, new_w), (crop_h, crop_w), (w, h) = size, crop, image.size
    left, top = _crop_start(new_w, crop_w), _crop_start(new_h, crop_h)
    x0, x1, y0, y1 = max(left, 0), min(left + crop_w, new_w), max(top, 0), min(top + crop_h, new_h)
    if (new_w, new_h) == (w, h):
        kept = image if (x0, y0, x1, y1) == (0, 0, w, h) else image.crop((x0, y0, x1, y1))
    elif new_w * new_h <= BOX_RESIZE_AREA * crop_w * crop_h:  # exactly open_clip's resize, then crop
        kept = image.resize((new_w, new_h), resample)
        kept = kept if (x0, y0, x1, y1) == (0, 0, new_w, new_h) else kept.crop((x0, y0, x1, y1))
    else:
        sx, sy = w / new_w, h / new_h
        kept = image.resize((x1 - x0, y1 - y0), resample, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    if kept.size == (crop_w, crop_h):
        return kept
    canvas = Image.new("RGB", (crop_w, crop_h))  # outside the image reads as 0
    canvas.paste(kept, (x0 - left, y0 - top))
    return canvas


def _from_array(array: np.ndarray, index: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(
            f"image {index}: array dtype {array.dtype} is not uint8; pass uint8 HWC pixels, "
            "or a float32 NCHW batch that is already preprocessed"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(
            f"image {index}: uint8 array of shape {array.shape} is not HxW, HxWx1, HxWx3 or HxWx4"
        )
    if min(array.shape[:2]) < 1:
        raise InputError(f"image {index}: array of shape {array.shape} is empty")
    return Image.fromarray(np.ascontiguousarray(array))


def _check_float_batch(batch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    expected = (3, *size)
    if batch.dtype != np.float32:
        raise InputError(
            f"preprocessed batch dtype is {batch.dtype}, expected float32 (or pass uint8 HWC images)"
        )
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
        raise InputError(
            f"preprocessed batch has shape {tuple(batch.shape)}, expected (N, {expected[0]}, "
            f"{expected[1]}, {expected[2]}) for this bundle"
        )
    if batch.shape[0] == 0:
        raise InputError("empty batch: pass at least one image")
    largest = float(np.maximum(np.maximum.reduce(batch, axis=None), -np.minimum.reduce(batch, axis=None)))
    if largest <= MAX_ABS_INPUT:  # False for NaN too: the usual case costs two reductions, the details come on failure
        return np.ascontiguousarray(batch)
    if not np.isfinite(batch).all():
        bad = int(np.count_nonzero(~np.isfinite(batch)))
        raise InputError(f"preprocessed batch holds {bad} NaN or Inf values; check the input")
    raise InputError(f"preprocessed batch holds values up to {largest:.3g}, beyond +-{MAX_ABS_INPUT:g}: "
                     "not a normalised image ((pixel / 255 - mean) / std); pass uint8 images instead")


def to_batch(images: Any, transform: ImageTransform) -> np.ndarray:
    """Paths, encoded image bytes, PIL images, uint8 HWC arrays, or a float32 NCHW batch -> float32 NCHW
    batch. Paths and bytes go through the decoder every path shares (image_decode, default limits)."""
    if isinstance(images, np.ndarray) and images.dtype != np.uint8:
        return _check_float_batch(images, transform.image_size)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items: Sequence[Any] = list(images)  # a stack of uint8 HWC images
    elif isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)):
        items = [images]
    elif isinstance(images, Iterable):
        items = list(images)
    else:
        raise InputError(
            f"cannot read images from {type(images).__name__}: pass paths, encoded bytes, PIL images, "
            "uint8 HWC arrays or a float32 NCHW batch"
        )
    if not items:
        raise InputError("empty batch: pass at least one image")
    out = np.empty((len(items), 3, *transform.image_size), np.float32)
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            image = load_image(item)
        elif isinstance(item, (bytes, bytearray)):
            image = decode_image(bytes(item), f"image {i} ({len(item):,} bytes)",
                                 lambda w, h, i=i: DecodeLimits().check(w, h, f"image {i}"))
        elif isinstance(item, Image.Image):
            image = item
            if min(image.size) < 1:
                raise InputError(f"image {i}: the PIL image is empty ({image.size[0]}x{image.size[1]} pixels)")
        elif isinstance(item, np.ndarray):
            image = _from_array(item, i)
        else:
            raise InputError(
                f"image {i} is a {type(item).__name__}: pass a path, encoded bytes, a PIL image or a uint8 HWC array"
            )
        out[i] = transform(image)
    return out
