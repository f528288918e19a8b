"""Image loading and open_clip's eval transform, in numpy + Pillow (no torch).

Steps and rounding follow open_clip's `image_transform(..., is_train=False)` on PIL
images exactly: resize (Pillow, antialiased, in the image's own mode; bicubic whatever the
configured interpolation for "shortest" on a non-square size, as open_clip does), center crop
(zero padding where the image is smaller), convert to RGB, scale to [0, 1], then
(x - mean) / std in float32. `to_batch` turns what a user passes to
`Engine.predict` into one validated float32 NCHW batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from rmt_deploy.errors import InputError

__all__ = ["ImageTransform", "load_image", "to_batch"]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "random": Image.Resampling.BICUBIC}  # open_clip evaluates 'random' as bicubic
_RESIZE_MODES = ("shortest", "longest", "squash")


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
        """One PIL image -> float32 [3, H, W], normalised."""
        image = self._resize(image)
        image = _center_crop(image, self.image_size)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        pixels /= np.float32(255.0)
        pixels -= np.asarray(self.mean, np.float32)
        pixels /= np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _resize(self, image: Image.Image) -> Image.Image:
        height, width = self.image_size
        w, h = image.size
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
        if [h, w] == size:
            return image
        return image.resize((size[1], size[0]), resample)


def _keep_ratio_size(source: tuple[int, int], target: tuple[int, int], longest: bool) -> list[int]:
    """open_clip ResizeKeepRatio: [h, w] scaled to fit the target's shortest (or longest) edge ratio."""
    ratio_h, ratio_w = source[0] / target[0], source[1] / target[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return [round(source[0] * 1.0 / ratio), round(source[1] * 1.0 / ratio)]


def _center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision center_crop on PIL: pad with zeros where smaller, then crop at rounded center."""
    crop_h, crop_w = size
    w, h = image.size
    if (w, h) == (crop_w, crop_h):
        return image
    left = -((crop_w - w) // 2) if crop_w > w else int(round((w - crop_w) / 2.0))
    top = -((crop_h - h) // 2) if crop_h > h else int(round((h - crop_h) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))  # outside the image reads as 0


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully; InputError names the file if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {str(path)!r}: {type(exc).__name__}: {exc}") from None


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
    if not np.isfinite(batch).all():
        bad = int(np.count_nonzero(~np.isfinite(batch)))
        raise InputError(f"preprocessed batch holds {bad} NaN or Inf values; check the input")
    return np.ascontiguousarray(batch)


def to_batch(images: Any, transform: ImageTransform) -> np.ndarray:
    """Paths, PIL images, uint8 HWC arrays, or a float32 NCHW batch -> float32 NCHW batch."""
    if isinstance(images, np.ndarray) and images.dtype != np.uint8:
        return _check_float_batch(images, transform.image_size)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items: Sequence[Any] = list(images)  # a stack of uint8 HWC images
    elif isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        items = [images]
    elif isinstance(images, Iterable):
        items = list(images)
    else:
        raise InputError(
            f"cannot read images from {type(images).__name__}: pass paths, PIL images, "
            "uint8 HWC arrays or a float32 NCHW batch"
        )
    if not items:
        raise InputError("empty batch: pass at least one image")
    out = np.empty((len(items), 3, *transform.image_size), np.float32)
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            image = load_image(item)
        elif isinstance(item, Image.Image):
            image = item
        elif isinstance(item, np.ndarray):
            image = _from_array(item, i)
        else:
            raise InputError(
                f"image {i} is a {type(item).__name__}: pass a path, a PIL image or a uint8 HWC array"
            )
        out[i] = transform(image)
    return out
