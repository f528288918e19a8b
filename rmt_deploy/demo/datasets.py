"""Small real-image tasks for the demo, built from images that ship inside PyPI packages.

- textures: crops of scikit-image's brick, grass and gravel photographs
  (train crops from the top 60% of each photo, test crops from the bottom 40%).
- digits: scikit-learn's 8x8 handwritten digits, upscaled.
Each is written as an image folder with train/, val/ and test/ class folders,
the layout `rmt-deploy train --dataset imagefolder` reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rmt_deploy.errors import require


@dataclass(frozen=True)
class DemoTask:
    """A task the demo builds: its name, classes, prompt template and folder."""

    name: str
    class_names: list[str]
    template: str
    root: Path


def _save(images: list[np.ndarray], folder: Path, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).convert("RGB").save(folder / f"{prefix}_{i:03d}.png")


def _random_crops(photo: np.ndarray, rows: slice, count: int, size: int, rng: np.random.Generator) -> list:
    region = photo[rows]
    ys = rng.integers(0, region.shape[0] - size, count)
    xs = rng.integers(0, region.shape[1] - size, count)
    return [region[y:y + size, x:x + size] for y, x in zip(ys, xs)]


def build_textures(root: Path, shots: int, test_per_class: int, seed: int = 0) -> DemoTask:
    """Brick / grass / gravel texture crops from scikit-image, disjoint train and test regions."""
    data = require("skimage.data", "demo")
    rng = np.random.default_rng(seed)
    classes = ["brick", "grass", "gravel"]
    for name in classes:
        photo = getattr(data, name)()
        split_row = int(photo.shape[0] * 0.6)
        train = _random_crops(photo, slice(0, split_row), shots + 4, 96, rng)
        test = _random_crops(photo, slice(split_row, None), test_per_class, 96, rng)
        _save(train[:shots], root / "train" / name, name)
        _save(train[shots:], root / "val" / name, name)
        _save(test, root / "test" / name, name)
    return DemoTask("textures", classes, "{} texture.", root)


def build_digits(root: Path, shots: int, test_per_class: int, seed: int = 0, classes: int = 10) -> DemoTask:
    """scikit-learn's handwritten digits (8x8, 16 grey levels), upscaled to 32x32 RGB."""
    datasets = require("sklearn.datasets", "demo")
    digits = datasets.load_digits()
    rng = np.random.default_rng(seed)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][:classes]
    for label, name in enumerate(names):
        index = rng.permutation(np.flatnonzero(digits.target == label))
        images = [np.kron((digits.images[i] * 255 / 16).astype(np.uint8), np.ones((4, 4), np.uint8))
                  for i in index]
        _save(images[:shots], root / "train" / name, name)
        _save(images[shots:shots + 4], root / "val" / name, name)
        _save(images[shots + 4:shots + 4 + test_per_class], root / "test" / name, name)
    return DemoTask("digits", names, "a photo of the number {}.", root)
