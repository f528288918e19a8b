"""ImageNet's test-only variants in CoOp's layout, for domain generalisation (train ImageNet, test these).

    imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/   + classnames.txt
    imagenet-sketch/images/<wnid>/                                 + classnames.txt
    imagenet-adversarial/imagenet-a/<wnid>/   (200 classes)        + classnames.txt
    imagenet-rendition/imagenet-r/<wnid>/     (200 classes)        + classnames.txt

classnames.txt is a copy of imagenet/classnames.txt. ImageNet-V2 names its
class folders by ImageNet label (the wnids' order in that file). Every variant
is a class subset of ImageNet: `parent_classes` is ImageNet's label space
(wnids sorted, as the ImageNet reader orders them) and `parent_index` places
each class in it, so `eval` scores a task trained on ImageNet over exactly
the variant's classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rmt_deploy.errors import InputError
from rmt_deploy.training.datasets import (
    COOP_DATASETS,
    FewShotData,
    class_folders,
    clean_class_name,
    images_in,
    read_classnames,
)


@dataclass(frozen=True)
class Variant:
    """Where a variant lives under the data root and how its class folders are named."""

    folder: str
    image_dir: str
    folders_by_label: bool  # ImageNet-V2: folders "0".."999" are ImageNet labels in classnames.txt order


VARIANTS = {
    "imagenetv2": Variant("imagenetv2", "imagenetv2-matched-frequency-format-val", True),
    "imagenet_sketch": Variant("imagenet-sketch", "images", False),
    "imagenet_a": Variant("imagenet-adversarial", "imagenet-a", False),
    "imagenet_r": Variant("imagenet-rendition", "imagenet-r", False),
}


def read_variant(key: str, root: Path) -> FewShotData:
    """All of a variant's images as its test split (train and val empty), as a subset of ImageNet's classes."""
    variant = VARIANTS[key]
    image_dir = root / variant.folder / variant.image_dir
    if not image_dir.is_dir():
        raise InputError(f"{key} folder {str(image_dir)!r} not found: expected {variant.folder}/{variant.image_dir}/ "
                         f"and {variant.folder}/classnames.txt under the data root (CoOp layout)")
    names = read_classnames(root / variant.folder / "classnames.txt")
    file_order = list(names)
    parent = sorted(names)
    found = sorted((_wnid(folder, file_order, variant), folder) for folder in class_folders(image_dir))
    wnids = [w for w, _ in found]
    test = [(image, label) for label, (_, folder) in enumerate(found) for image in images_in(folder)]
    template = COOP_DATASETS["imagenet"].template
    return FewShotData(key, [clean_class_name(names[w]) for w in wnids], template, [], [], test,
                       [clean_class_name(names[w]) for w in parent], [parent.index(w) for w in wnids])


def _wnid(folder: Path, file_order: list[str], variant: Variant) -> str:
    if not variant.folders_by_label:
        if folder.name not in file_order:
            raise InputError(f"class folder {str(folder)!r} is not a wnid of its classnames.txt")
        return folder.name
    if not folder.name.isdigit() or int(folder.name) >= len(file_order):
        raise InputError(f"ImageNet-V2 class folder {str(folder)!r} is not a label 0..{len(file_order) - 1}")
    return file_order[int(folder.name)]
