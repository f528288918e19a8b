"""Image files to tensors: the dataset, its seeded sampler, the train augmentation and the eval transform.

Images are decoded by the runtime's decoder (RGB first, bounded) and scored through the runtime's
own eval transform (`eval_transform`), so the accuracy measured here is the accuracy a bundle serves.

Each training sample's augmentation is seeded from (seed, epoch, index), so
the augmented images of an epoch do not depend on worker count, rank count or
resuming: a 2-process run sees the same global batches as a 1-process run.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import torch

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.preprocess import ImageTransform
from rmt_deploy.runtime.preprocess import load_image as read_image_file
from rmt_deploy.training.datasets import Sample


def load_image(path: Path):
    """An RGB PIL image from the runtime's decoder; an unreadable file raises InputError naming it."""
    return read_image_file(path)


class EvalTransform:
    """The runtime's eval transform (runtime.preprocess.ImageTransform) returning a torch tensor [3, H, W]."""

    def __init__(self, preprocess: dict[str, Any]) -> None:
        self.transform = ImageTransform.from_config(SimpleNamespace(**preprocess))

    def __call__(self, image) -> torch.Tensor:
        return torch.from_numpy(self.transform(image))


def eval_transform(preprocess: dict[str, Any]) -> EvalTransform:
    """The eval transform for a base's preprocessing settings (basemodel.loading.preprocess_config)."""
    return EvalTransform(preprocess)


class ImageDataset(torch.utils.data.Dataset):
    """(transformed image, label) by index, or by (index, seed) to seed the random augmentation."""

    def __init__(self, samples: Sequence[Sample], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        image = load_image(path)
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


def batches(loader: torch.utils.data.DataLoader) -> Iterator:
    """Iterate a loader; an InputError raised in a worker comes back as its own one-line message."""
    try:
        yield from loader
    except InputError as exc:
        message = str(exc)
        if "Original Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.split("InputError: ", 1)[-1]
            raise InputError(message) from None
        raise


class SeededSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose items are (index, augmentation seed from seed, epoch, index)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        return iter([(i, (base + i) % (2**63 - 1)) for i in super().__iter__()])


def train_transform(preprocess: dict[str, Any]) -> Callable:
    """Random resized crop (scale 0.5-1, bicubic) + horizontal flip + CLIP normalisation."""
    from torchvision import transforms as T

    size = preprocess["image_size"]
    return T.Compose([
        T.RandomResizedCrop(tuple(size), scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(preprocess["mean"], preprocess["std"]),
    ])
