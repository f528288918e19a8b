"""Fixtures for training tests: small real image datasets written to disk in CoOp and folder layouts."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

CLASSES = ("banded_stripes", "Dotted", "grassy_field")


def write_image(path: Path, label: int, index: int, size: int = 40) -> None:
    """A real PNG/JPEG file whose colour and texture depend on its class."""
    from PIL import Image

    rng = np.random.default_rng(1000 * label + index)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.zeros((size, size, 3), np.float32)
    base[..., label % 3] = 170.0
    pattern = [np.sin(xx / 2.0), np.sin((xx + yy) / 3.0), np.cos(yy / 1.5)][label % 3]
    pixels = base + 60.0 * pattern[..., None] + rng.normal(0, 20, (size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def write_coop_dataset(
    root: Path, counts=(6, 2, 4), classes=CLASSES, folder="dtd", image_dir="images",
    split_file="split_zhou_DescribableTextures.json",
) -> Path:
    """A CoOp-format dataset: <folder>/<image_dir>/<class>/*.png|jpg plus its split JSON."""
    split = {}
    for part, count in zip(("train", "val", "test"), counts):
        entries = []
        for label, cname in enumerate(classes):
            for i in range(count):
                suffix = ".png" if i % 2 == 0 else ".jpg"
                rel = f"{cname}/{part}_{i}{suffix}"
                write_image(root / folder / image_dir / rel, label, zlib.crc32(f"{part}/{i}".encode()) % 997)
                entries.append([rel, label, cname])
        split[part] = entries
    (root / folder / split_file).write_text(json.dumps(split))
    return root


@pytest.fixture(scope="session")
def coop_root(tmp_path_factory) -> Path:
    """A session-wide DTD-layout data root: 3 classes, 6 train / 2 val / 4 test images each."""
    return write_coop_dataset(tmp_path_factory.mktemp("coop"))


def train_args(checkpoint, root, out, *extra) -> list[str]:
    """`rmt-deploy train` arguments for a 3-epoch tiny-model run on the DTD-layout data root."""
    return ["train", "--model", "rmt-tiny-vit", "--pretrained", str(checkpoint), "--dataset", "dtd",
            "--data-root", str(root), "--out", str(out), "--shots", "4", "--epochs", "3",
            "--batch-size", "4", "--lr", "2e-3", "--workers", "0", "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="session")
def trained(tiny_checkpoint, coop_root, tmp_path_factory) -> Path:
    """The output folder of one CLI training run (1 process, 3 epochs) on the DTD-layout data."""
    from rmt_deploy.cli import main

    out = tmp_path_factory.mktemp("run")
    main(train_args(tiny_checkpoint, coop_root, out))
    return out
