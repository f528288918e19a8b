"""The datasets' shared vocabulary: CoOp's table of the 11 datasets, the few-shot data type, and
the class-folder and class-name readers every dataset reader builds on (training.data for the
11 datasets and image folders, training.variants for ImageNet's test-only variants)."""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from rmt_deploy.artifacts.integrity import read_regular_file
from rmt_deploy.errors import InputError

MAX_LIST_FILE_BYTES = 256 << 20  # a split, class-name or variant list (CoOp's largest, SUN397's, is ~10 MB)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class CoopDataset:
    """Where a CoOp dataset lives under the data root and how its prompts read."""

    key: str
    coop_name: str
    folder: str
    image_dir: str
    split_file: str
    template: str


COOP_DATASETS = {
    d.key: d
    for d in [
        CoopDataset("imagenet", "ImageNet", "imagenet", "images", "classnames.txt", "a photo of a {}."),
        CoopDataset("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories",
                    "split_zhou_Caltech101.json", "a photo of a {}."),
        CoopDataset("oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
                    "a photo of a {}, a type of pet."),
        CoopDataset("stanford_cars", "StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json",
                    "a photo of a {}."),
        CoopDataset("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                    "a photo of a {}, a type of flower."),
        CoopDataset("food101", "Food101", "food-101", "images", "split_zhou_Food101.json",
                    "a photo of {}, a type of food."),
        CoopDataset("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", "variants.txt",
                    "a photo of a {}, a type of aircraft."),
        CoopDataset("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
        CoopDataset("dtd", "DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json",
                    "{} texture."),
        CoopDataset("eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json",
                    "a centered satellite photo of {}."),
        CoopDataset("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                    "a photo of a person doing {}."),
    ]
}

Sample = tuple[Path, int]


@dataclass
class FewShotData:
    """One dataset's class names, prompt template and its three splits."""

    name: str
    class_names: list[str]
    template: str
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    # a class subset of a larger label space (base/new halves, ImageNet-A/R): that space's class names,
    # and the index in it of each of this dataset's classes
    parent_classes: list[str] | None = None
    parent_index: list[int] | None = None

    def split(self, split: str) -> list[Sample]:
        """The samples of 'train', 'val' or 'test'."""
        if split not in ("train", "val", "test"):
            raise InputError(f"split {split!r} is not one of train, val, test")
        return getattr(self, split)


def clean_class_name(name: str, renames: dict[str, str] | None = None) -> str:
    """CoOp clean-up: lower case, '_' as a space (after a dataset's own renames, e.g. EuroSAT's)."""
    return (renames or {}).get(name, name).replace("_", " ").lower().strip()


def check_template(template: str) -> str:
    """A prompt template: exactly one '{}' (the class name), no other format field ('{{' / '}}' for braces)."""
    fix = "write one '{}' where the class name goes, e.g. 'a photo of a {}.' ('{{' and '}}' for literal braces)"
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise InputError(f"prompt template {template!r} is not a format string ({exc}): {fix}") from None
    if len(fields) != 1 or fields[0] != ("", "", None):
        found = ", ".join("{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                          for name, spec, conv in fields) or "none"
        raise InputError(f"prompt template {template!r} needs exactly one '{{}}' for the class name "
                         f"(found: {found}): {fix}")
    return template


def distinct_class_names(folders: list[Path]) -> list[str]:
    """Cleaned class names of class folders; InputError naming both folders when two clean to one name."""
    seen: dict[str, Path] = {}
    for folder in folders:
        name = clean_class_name(folder.name)
        if name in seen:
            raise InputError(f"class folders {str(seen[name])!r} and {str(folder)!r} both become class {name!r} "
                             "(names are lower-cased, '_' read as a space): rename or merge one of them")
        seen[name] = folder
    return list(seen)


def read_classnames(path: Path) -> dict[str, str]:
    """CoOp's ImageNet classnames.txt: one '<wnid> <class name>' per line, in file order."""
    if not path.exists():
        raise InputError(f"class name file {str(path)!r} not found: copy CoOp's imagenet/classnames.txt there")
    names = {}
    for line in read_list_file(path, "class name list (.txt)").splitlines():
        wnid, _, cname = line.strip().partition(" ")
        if wnid:
            names[wnid] = cname.strip()
    return names


def read_list_file(path: Path, what: str) -> str:
    """A dataset's text file (split, class names, variants), checked to be a regular file of bounded size."""
    data = read_regular_file(path, MAX_LIST_FILE_BYTES, what, InputError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a {what} file") from None


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
